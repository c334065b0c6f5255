"""What the admin API and /metrics may read of a running daemon, and what
root may ask it to change: a small typed interface (kmesh.daemon.Daemon
implements it; tests/unit/test_status_view.py checks that its readers use
nothing else)."""
from __future__ import annotations

from typing import Protocol

from kmesh.options import Options


class LastUpdate(Protocol):
    ok: bool
    source: str
    time: float

    def as_dict(self) -> dict: ...


class DaemonView(Protocol):
    opts: Options
    ready: bool
    version: int
    last_update: LastUpdate | None

    # -- reads -------------------------------------------------------------
    def summary(self) -> dict: ...                              # GET /status
    def envoy_config(self) -> dict: ...                         # GET /controller/envoy
    def dump_maps(self) -> dict: ...                            # GET /bpf/kmesh/maps
    def policy_state(self) -> tuple[list, list]: ...            # (clusters, listeners) with a policy
    def l7_status(self) -> dict: ...                            # GET /l7
    def l7_stats(self) -> tuple | None: ...                     # (handoff Stats, splice stats | None)
    def sockmap_status(self) -> dict: ...
    def workloads(self) -> dict: ...
    def accesslog_status(self) -> dict: ...
    def xds_connection(self) -> tuple[str, bool] | None: ...    # (server, connected) in ADS mode
    def bpf_maps(self) -> dict: ...                             # the loaded maps by name
    def map_entries(self) -> dict[str, tuple[int, int]]: ...
    def programs_attached(self) -> dict[str, bool]: ...
    def program_stats(self) -> dict[str, tuple[int, int]]: ...
    def cluster_names(self) -> dict[int, str]: ...

    # -- changes (root or the admin group) ---------------------------------
    def set_log_level(self, level: str) -> str: ...
    def set_accesslog(self, on: bool) -> dict | None: ...      # None: the data path is not loaded yet
    def enroll(self, action: str, selector: dict[str, str]) -> dict: ...
    def set_sockmap(self, on: bool) -> dict: ...
    def apply_text(self, text: str, source: str): ...           # an UpdateResult
