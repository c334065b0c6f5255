"""Removing what a daemon pinned: every kmesh link detached and every pin
removed (``kmesh-daemon cleanup`` and a daemon that does not keep its maps)."""
from __future__ import annotations

import logging
from pathlib import Path

from kmesh.bpf import loader
from kmesh.dataplane.sockmap import quiesce_pinned

log = logging.getLogger("kmesh.loader")   # as when it lived in the loader


def cleanup(bpf_fs_path: str) -> list[str]:
    """Detach every pinned kmesh link and remove every kmesh pin.

    Works without loading anything, so it also cleans up after a daemon that
    died or after a version whose object no longer matches.
    """
    root = Path(bpf_fs_path) / loader.PIN_DIR
    removed: list[str] = []
    link_dir = root / "link"
    try:
        quiesce_pinned(root)
    except OSError as e:
        log.warning("could not turn same-host acceleration off first", extra={"kv": {"error": str(e)}})
    if link_dir.is_dir():
        for pin in sorted(link_dir.iterdir()):
            try:
                loader.detach_pinned_link(pin)
            except OSError as e:
                log.warning("could not detach pinned link", extra={"kv": {"pin": str(pin), "error": str(e)}})
            pin.unlink(missing_ok=True)
            removed.append(str(pin))
    map_dirs = [root / "map", root / "staging"]
    for map_dir in map_dirs:
        if map_dir.is_dir():
            for pin in sorted(map_dir.iterdir()):
                pin.unlink(missing_ok=True)
                removed.append(str(pin))
    for d in (link_dir, *map_dirs, root):
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("left a directory that is not empty", extra={"kv": {"path": str(d), "error": e.strerror}})
    return removed
