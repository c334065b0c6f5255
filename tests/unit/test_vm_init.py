"""tests/vm's pure logic: kernel choice, apt sources, module order, /init, the run script, cpio.
No VM is booted here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm import kernels, qemu
from tests.vm.kernels import CpioEntry

SEARCH = """\
linux-image-6.1.0-47-cloud-amd64-dbg - Debug symbols for linux-image-6.1.0-47-cloud-amd64
linux-image-6.1.0-9-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-57-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-58-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-58-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.12.115+deb13-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-6.12.115+deb13.1-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-6.12.90+deb13-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-cloud-amd64 - Linux for x86-64 cloud (meta-package)
"""


def test_pick_kernel_package_newest_of_the_series_only():
    assert kernels.pick_kernel_package(SEARCH, "6.1") == "linux-image-6.1.0-57-cloud-amd64"
    assert kernels.pick_kernel_package(SEARCH, "6.12") == "linux-image-6.12.115+deb13.1-cloud-amd64"
    assert kernels.pick_kernel_package(SEARCH, "5.10") is None


HOST_SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://mirror.example/debian
Suites: bookworm
Components: main
"""


def test_private_sources_swap_the_codename_and_keep_the_mirror():
    assert kernels.private_sources(HOST_SOURCES, "bookworm", "bullseye").splitlines() == [
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bullseye main",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bullseye-updates main",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian-security bullseye-security main",
    ]


DEPS = {"virtiofs": ["fuse", "virtio_ring", "virtio"], "virtio_pci": ["virtio_ring", "virtio"],
        "virtio": ["virtio_ring"], "virtio_ring": [], "fuse": [], "overlay": [], "veth": []}


def test_resolve_modules_dependencies_first_each_once():
    order = kernels.resolve_modules(DEPS, set(), DEPS.__getitem__, ["virtio_pci", "virtiofs", "overlay"],
                                    ["veth", "not_in_this_kernel"])
    assert order == ["virtio_ring", "virtio", "virtio_pci", "fuse", "virtiofs", "overlay", "veth"]


def test_resolve_modules_skips_builtins_and_requires_the_required():
    avail = {"overlay": []}
    assert kernels.resolve_modules(avail, {"virtio_pci", "virtiofs"}, avail.__getitem__,
                                   ["virtio-pci", "virtiofs", "overlay"]) == ["overlay"]
    with pytest.raises(LookupError):
        kernels.resolve_modules(avail, set(), avail.__getitem__, ["virtiofs"])


def test_modinfo_depends():
    ko = b"\x7fELF...\0license=GPL\0depends=fuse,virtio_ring,virtio-x\0name=virtiofs\0"
    assert kernels.modinfo_depends(ko) == ["fuse", "virtio_ring", "virtio_x"]
    assert kernels.modinfo_depends(b"\0depends=\0name=overlay\0") == []
    assert kernels.modname("kernel/fs/fuse/virtio-fs.ko.zst") == "virtio_fs"


def test_init_script():
    init = kernels.render_init(["fuse", "virtiofs"])
    lines = init.splitlines()
    assert lines[0] == "#!/bin/busybox sh"
    assert "for k in fuse virtiofs; do insmod /lib/modules/$k.ko" in init
    assert "m -t virtiofs -o ro hostroot /lower" in lines
    assert "m -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot" in lines
    assert "m -t cgroup2 cgroup2 $R/sys/fs/cgroup/unified" in lines
    assert "m -t bpf bpf $R/sys/fs/bpf" in lines
    assert "mkdir -p $R/boot && cp /config $R/boot/config-$(uname -r)" in lines
    assert "ip link set lo up || die \"lo up\"" in lines
    # the command runs after every mount, then the marker, then power off
    run = next(i for i, line in enumerate(lines) if "chroot $R /bin/sh /run/kmesh-run.sh" in line)
    assert run > max(i for i, line in enumerate(lines) if line.startswith("m "))
    assert lines[run + 1:run + 2] == ["rc=$?"]
    assert 'echo "KMESH_VM_EXIT=$rc"' in lines[run:]
    assert lines.index("poweroff -f", run) > lines.index('echo "KMESH_VM_EXIT=$rc"')
    # the recipe key tracks the template
    assert len(kernels.recipe_key()) == 12


def test_run_script_quotes_argv_cwd_and_env(tmp_path: Path):
    odd = tmp_path / "dir with 'quotes' and $x"
    odd.mkdir()
    argv = [sys.executable, "-c", "import os, sys; print(repr((os.getcwd(), sys.argv[1:], os.environ['K'])))",
            "a b", "$HOME", "it's", ""]
    script = qemu.render_run_script(argv, str(odd), {"K": "v; $(false) 'q'"})
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert eval(out) == (str(odd), ["a b", "$HOME", "it's", ""], "v; $(false) 'q'")
    with pytest.raises(ValueError):
        qemu.render_run_script(["true"], "/", {"A-B": "x"})
    with pytest.raises(ValueError):
        qemu.render_run_script([], "/")


def test_run_script_exit_status_and_missing_cwd():
    assert subprocess.run(["sh", "-c", qemu.render_run_script(["sh", "-c", "exit 7"])]).returncode == 7
    assert subprocess.run(["sh", "-c", qemu.render_run_script(["true"], "/no/such/dir")],
                          capture_output=True).returncode == 126


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    files, off = {}, 0
    while True:
        assert off % 4 == 0 and data[off:off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i:off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = f[1], f[6], (f[9], f[10]), f[11]
        name = data[off + 110:off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return files
        files[name] = (mode, data[off:off + size], rdev)
        off = (off + size + 3) & ~3


def test_cpio_newc():
    archive = kernels.cpio_newc([CpioEntry("dev", 0o040755), CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
                                 CpioEntry("/init", 0o100755, b"#!/bin/sh\n"), CpioEntry("x", 0o100644, b"12345")])
    assert parse_newc(archive) == {"dev": (0o040755, b"", (0, 0)), "dev/console": (0o020600, b"", (5, 1)),
                                   "init": (0o100755, b"#!/bin/sh\n", (0, 0)), "x": (0o100644, b"12345", (0, 0))}
    assert kernels.gz(archive) == kernels.gz(archive)   # reproducible: no timestamp


def test_qemu_argv_tcg_and_no_network():
    k = kernels.Kernel("6.1", "p", "v", "r", Path("/k"))
    argv = qemu.qemu_argv(k, Path("/t/initrd"), Path("/t/s"), 2, "2G")
    joined = " ".join(argv)
    assert "-accel tcg,thread=multi" in joined and "kvm" not in joined
    assert "-nic none" in joined and "-nodefaults" in argv
    assert "memory-backend-memfd,id=mem,size=2G,share=on" in argv
    assert argv[argv.index("-append") + 1].split()[:3] == ["console=ttyS0", "panic=-1", "quiet"]


def test_command_output_between_markers():
    r = qemu.VMResult(0, "boot\nKMESH_VM_START\nhello\nworld\nKMESH_VM_EXIT=0\n[ 1.0] reboot", 1.0, 0.5)
    assert r.command_output == "hello\nworld"
