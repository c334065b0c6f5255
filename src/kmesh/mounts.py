"""bpffs and cgroup2: find out what a path is on, mount when missing, and
remember what kmesh mounted so that an uninstall removes exactly that.

The record, ``$KMESH_RUN_DIR/mounts-made`` (default /run/kmesh), is shared
with systemd/kmesh-start-pre.sh: one path per line. /run is a tmpfs, so the
record and the mounts both go away at reboot.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("kmesh.mounts")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def record_path() -> str:
    return os.path.join(os.environ.get("KMESH_RUN_DIR", "/run/kmesh"), "mounts-made")


def _recorded() -> list[str]:
    try:
        with open(record_path()) as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _record(path: str) -> None:
    if path in _recorded():
        return
    os.makedirs(os.path.dirname(record_path()), exist_ok=True)
    with open(record_path(), "a") as f:
        f.write(path + "\n")


def unmount_recorded() -> list[str]:
    """Unmount what kmesh mounted (newest first); returns the paths
    unmounted. A mount still in use stays, with a warning."""
    done, left = [], []
    for path in reversed(_recorded()):
        if not os.path.ismount(path):
            continue
        if _libc.umount2(path.encode(), 0) != 0:
            err = ctypes.get_errno()
            log.warning("could not unmount", extra={"kv": {"path": path, "error": os.strerror(err)}})
            left.append(path)
            continue
        done.append(path)
    if left:
        with open(record_path(), "w") as f:
            f.writelines(p + "\n" for p in reversed(left))
    else:
        try:
            os.unlink(record_path())
        except FileNotFoundError:
            pass
    return done


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def fs_type(path: str) -> str | None:
    """Filesystem type of the mount holding ``path`` (longest prefix wins)."""
    path = os.path.realpath(path)
    best, best_type = "", None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mnt = _unescape(left.split()[4])
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, best_type = mnt, right.split()[0]
    return best_type


def is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)


def _mount(source: str, target: str, fstype: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {fstype} {target}: {os.strerror(err)}")


def _ensure(path: str, fstype: str, source: str) -> bool:
    os.makedirs(path, exist_ok=True)
    if fs_type(path) == fstype:
        return False
    log.info(f"mounting {fstype}", extra={"kv": {"path": path}})
    _mount(source, path, fstype)
    _record(os.path.realpath(path))
    return True


def ensure_bpffs(path: str) -> bool:
    """Make ``path`` a directory on bpffs; returns True if we mounted it."""
    return _ensure(path, "bpf", "bpf")


def ensure_cgroup2(path: str) -> bool:
    """Make ``path`` a cgroup2 directory; returns True if we mounted it."""
    return _ensure(path, "cgroup2", "none")
