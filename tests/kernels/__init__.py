"""The kernel matrix: kmesh's own tests on Debian's stock kernels under qemu
(tests/vm), and the README's kernel table generated from what they observed."""
