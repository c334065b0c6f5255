"""Fetch Debian's stock cloud kernels into a cache and build a busybox initramfs for each.

Cache layout, keyed on the package version so that a second fetch downloads and builds nothing:

    $KMESH_TEST_CACHE/kernels/<name>/apt/                 private apt sources, lists and archives
    $KMESH_TEST_CACHE/kernels/<name>/<version>/           kernel.deb vmlinuz config meta.json
                                                          initramfs-<recipe>.cpio.gz
    $KMESH_TEST_CACHE/kernels/<name>/current -> <version>

Kernels come from the same archive the host uses (URIs read from its deb822 sources), through a
private apt configuration: the system's sources, lists and caches are never touched.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Kernel name -> the Debian suite whose main archive ships linux-image-<name>...-cloud-amd64.
SUITES = {"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie"}

# Loaded by /init (with their dependencies from modules.dep) unless built in. The cloud kernels have
# no 9p; virtiofs (+fuse), overlay and, on some, virtio_pci are modules.
REQUIRED_MODULES = ("virtio_pci", "virtiofs", "overlay")
# Best effort. The guest runs on the host's root, which has no modules for the guest kernel (and no
# kmod), so nothing can be auto-loaded later: preload what tests use. veth: test network namespaces.
OPTIONAL_MODULES = ("veth", "dummy", "sch_ingress", "cls_bpf")

HOST_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
BUSYBOX = Path("/usr/bin/busybox")
EXIT_MARKER = "KMESH_VM_EXIT="   # /init prints KMESH_VM_EXIT=<rc> once the command has finished
START_MARKER = "KMESH_VM_START"  # /init prints this just before running the command
RUN_SCRIPT = "kmesh-run.sh"      # in the per-run cpio; copied to /run/ in the guest root


def log(msg: str) -> None:
    print(f"[vm] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("KMESH_TEST_CACHE", "/var/cache/kmesh-tests")) / "kernels"


@dataclass(frozen=True)
class Kernel:
    name: str      # "6.1"
    package: str   # linux-image-6.1.0-NN-cloud-amd64
    version: str   # the package version, the cache key
    release: str   # uname -r in the guest
    dir: Path

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def config(self) -> Path:
        return self.dir / "config"

    @property
    def initramfs(self) -> Path:
        return self.dir / f"initramfs-{recipe_key()}.cpio.gz"


# ---- pure logic (unit tested) ---------------------------------------------------------------

def pick_kernel_package(search_output: str, name: str) -> str | None:
    """The newest `linux-image-<name>...-cloud-amd64` in `apt-cache search` output (not -dbg/-unsigned).

    "6.1" must not match 6.12, hence the [.-] after the series; versions sort numerically
    (6.1.0-57 > 6.1.0-9, 6.12.115+deb13.1 > 6.12.115+deb13)."""
    pat = re.compile(rf"^(linux-image-({re.escape(name)}[.-][0-9][\w.+~-]*?)-cloud-amd64)\s+-\s")
    found = [(tuple(int(n) for n in re.findall(r"\d+", m[2])), m[1])
             for m in map(pat.match, search_output.splitlines()) if m]
    return max(found)[1] if found else None


def private_sources(deb822: str, host_codename: str, suite: str) -> str:
    """One-line apt sources for `suite` (main only), made from the host's deb822 sources by
    replacing its codename: bookworm-security on the security URI becomes bullseye-security there."""
    lines = []
    for stanza in re.split(r"\n\s*\n", deb822):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:       # continuation line (e.g. an inline key block)
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        keyring = fields.get("signed-by", "")
        if not keyring.startswith("/") or "\n" in keyring:
            keyring = DEFAULT_KEYRING
        for uri in fields.get("uris", "").split():
            for s in fields.get("suites", "").split():
                if s == host_codename or s.startswith(host_codename + "-"):
                    lines.append(f"deb [signed-by={keyring}] {uri} {suite}{s[len(host_codename):]} main")
    return "\n".join(lines) + "\n"


def modname(path: str) -> str:
    """virtio_pci from .../virtio_pci.ko.xz; the kernel treats - and _ in module names alike."""
    return os.path.basename(path).split(".ko")[0].replace("-", "_")


def modinfo_depends(ko: bytes) -> list[str]:
    """The `depends=` entry of a module's .modinfo section (NUL-separated key=value strings).
    Debian's kernel packages have no modules.dep (depmod makes it at install time), and the host
    has no kmod, so dependencies come from the modules themselves."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [modname(d) for d in m[1].decode().split(",") if d] if m else []


def resolve_modules(available: Collection[str], builtin: Collection[str],
                    depends: Callable[[str], Sequence[str]],
                    required: Sequence[str], optional: Sequence[str] = ()) -> list[str]:
    """Module names to insmod, dependencies first, for `required` + `optional`.

    Built-in modules are skipped; a missing required module raises, a missing optional one is
    dropped (that kernel just doesn't have it)."""
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in builtin or mod in order:
            return
        if mod not in available:
            raise LookupError(f"module {mod} is neither built in nor in the kernel package")
        for dep in depends(mod):
            visit(dep)
        order.append(mod)

    for mod in required:
        visit(modname(mod))
    for mod in map(modname, optional):
        if mod in available or mod in builtin:
            visit(mod)
    return order


def render_init(modules: Sequence[str]) -> str:
    """/init of the initramfs; `modules` are /lib/modules/<name>.ko to load, in order.

    Host root (virtiofs, read-only) + tmpfs upper -> overlay /newroot, the usual API filesystems
    inside it, then /kmesh-run.sh runs there (chroot), its status is printed, and the VM powers off."""
    mods = " ".join(modules)
    return f"""#!/bin/busybox sh
# Generated by tests/vm/kernels.py. PID 1 of the kmesh test VM.
/bin/busybox --install -s /bin
export PATH=/bin
die() {{ echo "kmesh-vm: init failed: $*"; sync; poweroff -f; sleep 5; }}
m() {{ mount "$@" || die "mount $*"; }}
m -t proc proc /proc
m -t sysfs sysfs /sys
m -t devtmpfs devtmpfs /dev
# In dependency order; a failure shows up as a failed mount below (or a missing test feature).
for k in {mods}; do insmod /lib/modules/$k.ko || echo "kmesh-vm: insmod $k failed"; done
m -t virtiofs -o ro hostroot /lower
m -t tmpfs -o mode=0755 tmpfs /upper
mkdir /upper/data /upper/work
# Writes land in RAM: the host's files stay untouched.
m -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot
R=/newroot
m -t proc proc $R/proc
m -t sysfs sysfs $R/sys
m -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
m -t devpts -o mode=0620,ptmxmode=0666 devpts $R/dev/pts
m -t tmpfs -o mode=1777 tmpfs $R/dev/shm
# /tmp stays the overlay's: a checkout under the host's /tmp (a CI clone) must
# be visible; writes there land in RAM like every other.
m -t tmpfs -o mode=0755 tmpfs $R/run
m -t bpf bpf $R/sys/fs/bpf
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
# The host's layout, which tests expect: cgroup2 at /sys/fs/cgroup/unified.
m -t tmpfs -o mode=0755 cgroup $R/sys/fs/cgroup
mkdir $R/sys/fs/cgroup/unified
m -t cgroup2 cgroup2 $R/sys/fs/cgroup/unified
# libbpf resolves CONFIG_* externs from /boot/config-$(uname -r).
mkdir -p $R/boot && cp /config $R/boot/config-$(uname -r)
hostname kmesh-vm
ip link set lo up || die "lo up"
cp /{RUN_SCRIPT} $R/run/{RUN_SCRIPT}
echo {START_MARKER}
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb \\
    LANG=C.UTF-8 /bin/chroot $R /bin/sh /run/{RUN_SCRIPT} </dev/null
rc=$?
kill -9 -1 2>/dev/null   # whatever the command left behind; PID 1 survives this
sync
echo "{EXIT_MARKER}$rc"
poweroff -f
sleep 5
"""


def recipe_key() -> str:
    """Names the initramfs: changes whenever what goes into it (module lists, /init) changes."""
    text = render_init(["@"]) + repr((REQUIRED_MODULES, OPTIONAL_MODULES))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class CpioEntry:
    path: str
    mode: int            # including the file type bits (0o100000 file, 0o040000 dir, ...)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """An uncompressed 'newc' cpio archive, the format the kernel unpacks as an initramfs.
    Written here so that no staging tree (or mknod for /dev/console) is needed."""
    out = bytearray()

    def put(ino: int, e: CpioEntry) -> None:
        name = e.path.lstrip("/").encode() + b"\0"
        fields = (ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, *e.rdev, len(name), 0)
        out.extend(b"070701" + b"".join(b"%08x" % f for f in fields) + name)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(e.data)
        out.extend(b"\0" * (-len(out) % 4))

    ino = 0
    for ino, e in enumerate(entries, start=1):
        put(ino, e)
    put(ino + 1, CpioEntry("TRAILER!!!", 0))
    return bytes(out)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


# ---- cache ----------------------------------------------------------------------------------

@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialises fetch/build of one kernel between concurrent CI jobs."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _load(kdir: Path) -> Kernel | None:
    meta = kdir / "current" / "meta.json"
    if not meta.exists():
        return None
    m = json.loads(meta.read_text())
    return Kernel(m["name"], m["package"], m["version"], m["release"], (kdir / "current").resolve())


def cached_kernels() -> dict[str, Kernel]:
    """The kernels fetched so far, by name."""
    found = {name: _load(cache_root() / name) for name in SUITES}
    return {n: k for n, k in found.items() if k is not None}


def cached(name: str) -> Kernel:
    k = _load(cache_root() / name)
    if k is None:
        raise LookupError(f"kernel {name} is not cached: python3 -m tests.vm fetch {name}")
    return k


def guest_kernel_release(name: str) -> str:
    """`uname -r` of kernel `name` in the guest (it must be cached)."""
    return cached(name).release


def kernel_config_path(name: str) -> Path:
    """The extracted /boot/config-<release> of kernel `name` (it must be cached)."""
    return cached(name).config


class _Apt:
    """apt-get/apt-cache with private sources, lists and archives under `root`."""

    def __init__(self, root: Path, suite: str) -> None:
        for d in ("state/lists/partial", "cache/archives/partial"):
            (root / d).mkdir(parents=True, exist_ok=True)
        sources = root / "sources.list"
        sources.write_text(private_sources(HOST_SOURCES.read_text(), _host_codename(), suite))
        self.suites = sorted({line.split()[3] for line in sources.read_text().splitlines()})
        self.opts = ["-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=-",
                     "-o", f"Dir::State={root / 'state'}", "-o", f"Dir::Cache={root / 'cache'}",
                     "-o", "Acquire::Languages=none", "-o", "APT::Sandbox::User=root"]

    def __call__(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        p = subprocess.run([tool, "-q", *self.opts, *args], cwd=cwd, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
        return p.stdout


def _host_codename() -> str:
    m = re.search(r"^VERSION_CODENAME=\"?(\w+)", Path("/etc/os-release").read_text(), re.M)
    if not m:
        raise RuntimeError("no VERSION_CODENAME in /etc/os-release")
    return m[1]


def fetch(name: str, refresh: bool = False) -> Kernel:
    """Kernel `name` from the cache, fetched first if it is not there (or, with `refresh`, if the
    archive has a newer one), with an initramfs for the current recipe."""
    if name not in SUITES:
        raise ValueError(f"unknown kernel {name!r}; known: {', '.join(SUITES)}")
    kdir = cache_root() / name
    kdir.mkdir(parents=True, exist_ok=True)
    with _locked(kdir / ".lock"):
        k = None if refresh else _load(kdir)
        if k is None:
            k = _fetch_newest(name, kdir)
        if not k.initramfs.exists():
            with _unpacked(k.dir / "kernel.deb") as root:
                _build_initramfs(k, root)
    return k


def _fetch_newest(name: str, kdir: Path) -> Kernel:
    apt = _Apt(kdir / "apt", SUITES[name])
    log(f"{name}: apt-get update ({' '.join(apt.suites)})")
    apt("apt-get", "update")
    listing = apt("apt-cache", "search", "--names-only", "^linux-image-.*-cloud-amd64$")
    package = pick_kernel_package(listing, name)
    if package is None:
        raise LookupError(f"no linux-image-{name}*-cloud-amd64 in {' '.join(apt.suites)}; "
                          f"the archive offered:\n{listing}")
    version = re.search(r"^Version: (\S+)", apt("apt-cache", "show", "--no-all-versions", package), re.M)[1]
    vdir = kdir / version.replace(":", "%3a")
    if not (vdir / "meta.json").exists():
        stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=kdir))
        try:
            log(f"{name}: downloading {package} {version}")
            t = time.monotonic()
            apt("apt-get", "download", f"{package}={version}", cwd=stage)
            deb = next(stage.glob("*.deb")).rename(stage / "kernel.deb")
            log(f"{name}: {deb.stat().st_size / 1e6:.0f} MB in {time.monotonic() - t:.0f} s; unpacking")
            with _unpacked(deb) as root:
                release = _release_of(root)
                shutil.copyfile(root / "boot" / f"vmlinuz-{release}", stage / "vmlinuz")
                shutil.copyfile(root / "boot" / f"config-{release}", stage / "config")
                meta = dict(name=name, package=package, version=version, release=release)
                (stage / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
                k = Kernel(**meta, dir=stage)
                _build_initramfs(k, root)
            stage.chmod(0o755)
            stage.rename(vdir)   # atomic: a version dir is complete or absent
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    link = kdir / f".current-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(vdir.name)
    link.replace(kdir / "current")
    return _load(kdir)


@contextmanager
def _unpacked(deb: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=deb.parent.parent) as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        yield Path(tmp)


def _modules_dir(root: Path) -> Path:
    dirs = [*root.glob("lib/modules/*"), *root.glob("usr/lib/modules/*")]  # trixie: merged /usr
    if len(dirs) != 1:
        raise RuntimeError(f"expected one modules dir in the kernel package, found {dirs}")
    return dirs[0]


def _release_of(root: Path) -> str:
    return _modules_dir(root).name


def _decompressed(path: Path) -> bytes:
    """busybox insmod may not decompress: store plain .ko files."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=True).stdout
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def _build_initramfs(k: Kernel, root: Path) -> None:
    t = time.monotonic()
    bb = BUSYBOX.read_bytes()
    if b"ld-linux" in bb[:4096]:   # a PT_INTERP string: dynamically linked, useless as PID 1 here
        raise RuntimeError(f"{BUSYBOX} is not static (apt-get install busybox-static)")
    mdir = _modules_dir(root)
    files = {modname(p.name): p for p in mdir.rglob("*.ko*") if re.search(r"\.ko(\.xz|\.zst|\.gz)?$", p.name)}
    builtin = {modname(p) for p in (mdir / "modules.builtin").read_text().split()}
    data: dict[str, bytes] = {}

    def depends(mod: str) -> list[str]:
        data[mod] = _decompressed(files[mod])
        return modinfo_depends(data[mod])

    names = resolve_modules(files, builtin, depends, REQUIRED_MODULES, OPTIONAL_MODULES)
    entries = [CpioEntry(d, 0o040755) for d in ("bin", "dev", "proc", "sys", "lower", "upper",
                                                 "newroot", "lib", "lib/modules")]
    entries += [CpioEntry("dev/console", 0o020600, rdev=(5, 1)),  # init's stdio before devtmpfs
                CpioEntry("bin/busybox", 0o100755, bb),
                CpioEntry("init", 0o100755, render_init(names).encode()),
                CpioEntry("config", 0o100644, k.config.read_bytes())]
    entries += [CpioEntry(f"lib/modules/{n}.ko", 0o100644, data[n]) for n in names]
    tmp = k.initramfs.with_name(f".{k.initramfs.name}.{os.getpid()}")
    tmp.write_bytes(gz(cpio_newc(entries)))
    tmp.replace(k.initramfs)
    for old in k.dir.glob("initramfs-*.cpio.gz"):   # older recipes
        if old != k.initramfs:
            old.unlink()
    log(f"{k.name}: initramfs {k.initramfs.stat().st_size / 1e6:.1f} MB in {time.monotonic() - t:.1f} s, "
        f"modules: {' '.join(names) or '(all built in)'}")
