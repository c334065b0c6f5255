"""Boot Debian's stock kernels under qemu (TCG) over the host's root filesystem and run one command.

kernels.py fetches and caches kernels and builds their initramfs; qemu.py runs a command in a VM;
`python -m tests.vm --help` is the CLI.
"""
