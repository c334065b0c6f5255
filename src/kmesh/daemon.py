"""kmesh-daemon's lifecycle: start, reload, apply, stop.

Start order matters: the config is parsed before anything touches the
kernel (a bad file costs nothing), the maps are filled before the programs are
attached (the first connect already sees the whole config), and READY is sent
only after both.

Stop is "fail static", as Cilium's agent: the daemon exits and leaves its
pinned programs and maps in force with the last config, so a restart or an
upgrade takes them over without a gap. `kmesh-daemon cleanup` (and, under
systemd, `systemctl stop` through kmesh-stop-post.sh) removes them.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field

import sdnotify

from kmesh import __version__, log as kmlog, mounts
from kmesh.bpf import features as kfeatures, libbpf, loader, mapnames, records
from kmesh.config import bootstrap
from kmesh.config.errors import ConfigError, Problem
from kmesh.config.model import MeshConfig
from kmesh.config.builder import translate_bootstrap
from kmesh.dataplane import pins, policy_state, sockmap as sockmap_mod
from kmesh.dataplane.kconfig import KernelConfig
from kmesh.dataplane.maps import ConfigMaps
from kmesh.dataplane.plan import CapacityError, MapState, plan, plan_changes
from kmesh.options import Options, split_address

log = logging.getLogger("kmesh.daemon")


class StartError(RuntimeError):
    """The daemon cannot start; the message says what to do."""


@dataclass
class UpdateResult:
    ok: bool
    source: str
    version: int
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    changes: dict[str, int] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return {"result": "applied" if self.ok else "rejected", "source": self.source,
                "config_version": self.version, "warnings": self.warnings, "errors": self.errors,
                "changes": self.changes, "time": self.time}


def watchdog_interval() -> float:
    """Seconds between WATCHDOG=1 pings: half of systemd's WatchdogSec=, as
    sd_watchdog_enabled() reads it (0: no watchdog)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1e6 / 2


def raise_open_files_limit() -> int:
    """Every L7 connection costs the daemon two descriptors (and the admin
    API and xDS a few): the soft limit goes up to the hard one (LimitNOFILE=
    in the unit), as Go's runtime does for its daemons. The limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("could not raise the open files limit", extra={"kv": {"soft": soft, "hard": hard,
                                                                              "error": str(e)}})
    return soft


class Daemon:
    def __init__(self, opts: Options):
        self.opts = opts
        self.notifier = sdnotify.SystemdNotifier()
        self.ready = False
        self.version = 0
        self.active: bootstrap.LoadedConfig | None = None
        self.mesh = MeshConfig()
        self.last_update: UpdateResult | None = None
        self._lock = threading.Lock()
        self._state = MapState()
        self._dataplane: loader.Dataplane | None = None
        self.l7 = None   # kmesh.l7.handoff.Handoff
        self._maps: ConfigMaps | None = None
        self._signals: queue.Queue[int] = queue.Queue()
        self.admin = None
        self.ads = None
        self._ads_gave_up = False   # ADS never synced within -xds-ready-timeout: L7 serves what it has
        self.sockmap: sockmap_mod.Sockmap | None = None
        self.accesslog = None
        self.sockmap_state = "off"        # on, off, draining (off, connections still enrolled)
        self._next_housekeeping = 0.0
        self.features: kfeatures.Features | None = None
        self._workloads = None            # kmesh.dataplane.workloads.WorkloadStore, once loaded

    # -- lifecycle --------------------------------------------------------
    def start(self) -> None:
        if not self.opts.enable_kmesh:
            raise StartError("nothing to run: -enable-kmesh=false turns off the only data path kmesh has")
        raise_open_files_limit()
        self._status("parsing config")
        cfg = bootstrap.load_file(self.opts.config_file)   # ConfigError propagates
        if self.opts.enable_ads:
            self._init_ads(cfg)
            warnings = self.ads.state.check_static(cfg)   # ConfigError propagates
        else:
            mesh = translate_bootstrap(cfg)
            warnings = list(mesh.warnings)
        for w in warnings:
            log.warning("config warning", extra={"kv": {"detail": w}})

        from kmesh.admin.server import AdminServer  # late: keeps the CLI import light
        try:
            self.admin = AdminServer(self, self.opts.admin_address, self.opts.admin_socket, self.opts.admin_group,
                                     self.opts.metrics_address)
        except OSError as e:
            raise StartError(str(e)) from None
        self.admin.start()  # /ready answers 503 until the end of start()

        self._status("loading BPF programs")
        try:
            mounts.ensure_bpffs(self.opts.bpf_fs_path)
            mounts.ensure_cgroup2(self.opts.cgroup2_path)
        except OSError as e:
            raise StartError(f"{e}; kmesh needs root (CAP_SYS_ADMIN) to mount bpffs and cgroup2 (under kmesh.service, "
                             "kmesh-start-pre.sh mounts them: see `journalctl -u kmesh`)") from None
        try:
            self.features = kfeatures.without(kfeatures.decide(kfeatures.probe()),
                                              kfeatures.parse_disabled(self.opts.bpf_disable_features))
            for f in self.features.off():
                log.info("kernel feature off", extra={"kv": {
                    "feature": f.name, "kernel": self.features.release, "since": f.since, "needs": f.needs,
                    "instead": f.off_effect}})
            dp = loader.Dataplane(self.opts.bpf_fs_path, self.opts.cgroup2_path, sockmap=self.opts.enable_sockmap,
                                  features=self.features)
            dp.load()
        except (loader.LoaderError, OSError) as e:
            hint = ""
            if isinstance(e, OSError) and e.errno == errno.EROFS:
                hint = (f" ({self.opts.bpf_fs_path} is read-only to the daemon: under kmesh.service a bpffs other "
                        "than /sys/fs/bpf needs ReadWritePaths=-PATH in a drop-in, `systemctl edit kmesh`)")
            raise StartError(f"{e}{hint}") from None
        self._dataplane = dp
        if self.opts.bpf_stats:
            # Counted while this fd is open: it closes with the process.
            self._bpf_stats_fd = libbpf.enable_stats()
        from kmesh.accesslog import AccessLog

        # The access log writes km_config (close tracking and the log switch).
        self.kconfig = KernelConfig(dp.maps[mapnames.CONFIG])
        self.accesslog = AccessLog(dp.map_fds[mapnames.EVENTS], self.kconfig, dp.maps[mapnames.STATS],
                                   self.cluster_names, self.opts.access_log_file, self.opts.access_log_rate,
                                   self.opts.track_connections)
        self.accesslog.set(self.opts.access_log)
        self._start_workloads(dp)
        self._start_l7(dp)
        if dp.sockmap:
            self._sockmap_on()
        else:
            self.sockmap_state = {"none": "off", "removed": "off"}.get(
                sockmap_mod.turn_off_pinned(dp.pin_root), "draining")
        self._maps = ConfigMaps(dp.maps[mapnames.LISTENER], dp.maps[mapnames.CLUSTER], dp.maps[mapnames.EP_ACTIVE],
                                {n: dp.maps[n] for n in loader.POLICY_STATE_MAPS}, dp.maps[mapnames.LISTENER_PORTS])
        self._state = self._maps.read_state()

        if self.ads and dp.took_over and not dp.migrating:
            # Keep serving what is pinned until the control plane's first full
            # set arrives; writing the static part alone would unmap VIPs.
            self.ads.state.hold_until_warm = True
            self.active = cfg
        else:
            self._status("applying config")
            result = self._update_static(cfg) if self.ads else self._apply(cfg, mesh)
            if not result.ok:
                raise StartError("; ".join(result.errors))
        attached = []
        if self.ads and dp.migrating:
            # The new maps are filled by the control plane's first full set;
            # until then the old programs keep serving from the old maps.
            self._wait_for_control_plane()
            if self.ads.state.synced.is_set():
                attached = self._attach()
            else:
                log.warning("pins of another layout are still in force: switching once the control plane's "
                            "first full config is in")
        else:
            attached = self._attach()
            if self.ads:
                self._wait_for_control_plane()
        self.ready = True
        self.notifier.notify("READY=1\nSTATUS=ready")
        counts = self.counts()
        log.info("kmesh-daemon ready", extra={"kv": {
            "version": __version__, "mode": "ads" if self.ads else "standalone", "config": self.opts.config_file,
            "listeners": counts["listeners"], "clusters": counts["clusters"],
            "takeover": dp.took_over, "programs": ",".join(f"{a.program}:{a.action}" for a in attached),
            "admin": self.admin.address, "admin_socket": self.admin.socket, "metrics": self.admin.metrics_address}})

    def _attach(self) -> list:
        dp = self._dataplane
        self._status("attaching programs")
        try:
            attached = dp.attach()
        except OSError as e:
            if not dp.took_over:
                pins.cleanup(self.opts.bpf_fs_path)
            raise StartError(f"attach to cgroup {self.opts.cgroup2_path}: {e}") from None
        dp.finish()
        return attached

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config file. Pings
        systemd's watchdog while healthy (WatchdogSec= in the unit)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: self._signals.put(s))
        interval = watchdog_interval()
        tick = min(1.0, interval) if interval else 1.0
        next_ping = 0.0
        while True:
            now = time.monotonic()
            if interval and now >= next_ping and self.healthy():
                self.notifier.notify("WATCHDOG=1")
                next_ping = now + interval
            try:
                sig = self._signals.get(timeout=tick)
            except queue.Empty:
                self._switch_if_due()
                self._housekeeping()
                continue
            if sig == signal.SIGHUP:
                self.reload()
            else:
                self.stop()
                return 0

    # -- same-host acceleration ---------------------------------------------
    def _sockmap_on(self) -> None:
        self.sockmap = sockmap_mod.Sockmap(self._dataplane.maps)
        self.sockmap.sync_local_addresses()
        self.sockmap.set_redirect(True)
        self.sockmap_state = "on"

    # -- workloads ------------------------------------------------------------
    def workloads(self) -> dict:
        """What is enrolled and bypassed, and the namespaces the L7 hand-off
        listens in."""
        return {"workloads": [w.as_dict() for w in self._workloads.all()] if self._workloads else [],
                "default": self.opts.workloads, "scope": self.opts.cgroup2_path,
                "namespaces": self.l7.namespaces() if self.l7 else []}

    def enroll(self, action: str, selector: dict[str, str]) -> dict:
        """Enroll, bypass or unenroll the workload one selector names
        (workloads.name()). ValueError: a bad name; OSError: its namespace's
        hand-off listener could not be opened."""
        from kmesh.dataplane import workloads as wl

        if action not in ("enroll", "bypass", "unenroll"):
            raise ValueError(f"no such action {action!r}: enroll, bypass or unenroll")
        kind, path = wl.name(selector)
        wl.check_path(path)
        with self._lock:
            if action == "unenroll":
                w = self._workloads.named(kind, path)
                if w is not None:
                    self._forget(w)
                got = {"workload": (w.as_dict() if w else {"kind": kind.name.lower(), "path": path}),
                       "changed": w is not None}
            else:
                w = wl.Workload(kind, wl.identify(kind, path), path,
                                wl.Mode.ENROLLED if action == "enroll" else wl.Mode.BYPASS)
                before = self._workloads.get(kind, w.id)
                # A namespace's listener opens before connects are sent to it.
                if kind == wl.Kind.NETNS and w.mode == wl.Mode.ENROLLED and self.l7:
                    self.l7.add_netns(path)
                self._workloads.put(w)
                if kind == wl.Kind.NETNS and w.mode == wl.Mode.BYPASS and self.l7:
                    self.l7.remove_netns(w.id)
                got = {"workload": w.as_dict(), "changed": before is None or before.mode != w.mode}
        log.info(f"workload {action}ed", extra={"kv": got["workload"]})
        return {**got, **self.workloads()}

    def _forget(self, w) -> None:
        from kmesh.dataplane import workloads as wl

        self._workloads.remove(w)
        if w.kind == wl.Kind.NETNS and self.l7:
            self.l7.remove_netns(w.id)

    def _start_workloads(self, dp: loader.Dataplane) -> None:
        """km_workloads: carried over by an upgrade, the scope enrolled (or
        not) as -workloads says, and the daemon's own namespace and cgroup in
        km_config (its sockets are never governed)."""
        from kmesh.dataplane import workloads as wl

        self._workloads = wl.WorkloadStore(
            dp.maps[mapnames.WORKLOADS], lambda: self.kconfig.set(workloads_gen=wl.next_gen(self.kconfig.record)))
        if dp.migrating:
            for w in wl.carried_over(dp.map_dir):
                self._workloads.put(w)
        scope = None
        if self.opts.workloads == "all":
            try:
                ident = wl.identify(wl.Kind.CGROUP, self.opts.cgroup2_path)
            except ValueError as e:
                raise StartError(f"-workloads=all: {e}") from None
            scope = self._workloads.get(wl.Kind.CGROUP, ident)
            if scope is None or scope.scope:   # one a user enrolled stays theirs
                scope = wl.Workload(wl.Kind.CGROUP, ident, self.opts.cgroup2_path, scope=True)
            self._workloads.put(scope)   # first: a restart never leaves the scope ungoverned
        for w in self._workloads.all():
            if w.scope and w != scope:
                self._workloads.remove(w)
        own_cgroup = 0
        try:
            own_cgroup = os.stat(wl.cgroup_path_of_pid(os.getpid(), wl.cgroup2_root())).st_ino
        except (OSError, ValueError) as e:
            log.warning("the daemon's own cgroup is unknown: its L7 upstream connections could be governed "
                        "inside enrolled namespaces", extra={"kv": {"error": str(e)}})
        self.kconfig.set(daemon_netns=wl.own_netns_inode(), daemon_cgroup=own_cgroup,
                         workloads_gen=wl.next_gen(self.kconfig.record))
        self._prune_workloads()

    def _open_workload_listeners(self) -> None:
        """Open the hand-off listener in each enrolled namespace (before
        L7 connects are handed off again)."""
        from kmesh.dataplane import workloads as wl

        opened = 0
        for w in self._workloads.all():
            if w.kind != wl.Kind.NETNS or w.mode != wl.Mode.ENROLLED:
                continue
            try:
                self.l7.add_netns(w.path)
                opened += 1
            except OSError as e:
                log.warning("could not open the hand-off listener in an enrolled namespace; unenrolled",
                            extra={"kv": {**w.as_dict(), "error": str(e)}})
                self._workloads.remove(w)
        if opened:
            log.info("hand-off listeners opened in enrolled namespaces", extra={"kv": {"namespaces": opened}})

    def _prune_workloads(self) -> None:
        """Forget workloads whose cgroup or namespace is gone (a pod was
        deleted): a namespace's listener would keep it alive."""
        from kmesh.dataplane import workloads as wl

        if self._workloads is None:
            return
        for w in self._workloads.all():
            if not wl.still_there(w):
                self._forget(w)
                log.info("an enrolled workload is gone; forgotten", extra={"kv": w.as_dict()})

    def set_sockmap(self, on: bool) -> dict:
        """Turn same-host acceleration on or off at runtime (admin API)."""
        with self._lock:
            if on and self.sockmap_state != "on":
                self._dataplane.load_sockmap()
                self._sockmap_on()
                log.info("same-host acceleration on")
            elif not on and self.sockmap_state == "on":
                self.sockmap.set_redirect(False)
                self.sockmap = None
                state = sockmap_mod.turn_off_pinned(self._dataplane.pin_root)
                self.sockmap_state = "draining" if state == "draining" else "off"
                log.info("same-host acceleration off", extra={"kv": {"state": self.sockmap_state}})
            return self.sockmap_status()

    def sockmap_status(self) -> dict:
        if self.sockmap:
            return {"state": self.sockmap_state, "sockets": self.sockmap.sockets()}
        left = sockmap_mod.pinned_sockets(self._dataplane.map_dir) if self._dataplane else None
        return {"state": self.sockmap_state, "sockets": left or 0}

    def _housekeeping(self) -> None:
        """Every few seconds: the host's addresses for the sockmap rules, and
        removing a turned-off sockmap once its last connection closed."""
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + 5.0
        try:
            with self._lock:
                self._prune_workloads()
                if self.sockmap and self.sockmap.sync_local_addresses():
                    log.info("local addresses for same-host acceleration updated")
                if self.sockmap_state == "draining" and \
                        sockmap_mod.turn_off_pinned(self._dataplane.pin_root) != "draining":
                    self.sockmap_state = "off"
        except OSError as e:
            log.warning("housekeeping failed", extra={"kv": {"error": str(e)}})

    def healthy(self) -> bool:
        """What the watchdog vouches for: the threads that serve are alive."""
        if self.admin and not self.admin.alive():
            return False
        return not (self.ads and not self.ads.alive())

    def _switch_if_due(self) -> None:
        """Finish a migration that waited for the control plane."""
        dp = self._dataplane
        if dp and dp.migrating and self.ads and self.ads.state.synced.is_set():
            try:
                self._attach()
            except StartError as e:
                log.error("could not switch to the migrated maps", extra={"kv": {"error": str(e)}})

    def stop(self) -> None:
        """Fail static: exit and leave the pinned programs and maps serving
        the last config; the next start takes them over."""
        self.ready = False
        self.notifier.notify("STOPPING=1")
        log.info("stopping")
        if self.ads:
            self.ads.stop()
        if self.admin:
            self.admin.stop()
        if self.l7:
            # Fail static for L7 too: its listeners fall back to their
            # catch-all route in the kernel instead of a closed port.
            self.kconfig.set(l7_handoff=records.KmeshAddr())
            self.l7.stop()
        if self.accesslog:
            if self.accesslog.enabled:
                self.accesslog.set(False)   # nobody reads the ring buffer from now on
            self.accesslog.close()
        if self._dataplane:
            self._dataplane.close()
        log.info("kmesh-daemon stopped; its programs stay attached with the last config until the next start "
                 f"(`kmesh-daemon -bpf-fs-path {self.opts.bpf_fs_path} cleanup` detaches them)")

    def abort(self) -> None:
        """A start that failed: close what it opened (the admin listeners and
        their socket file); the pins are as the failure left them."""
        if self.admin:
            self.admin.stop()
            self.admin = None

    def _status(self, text: str) -> None:
        self.notifier.notify(f"STATUS={text}")
        log.debug(text)

    # -- config updates ---------------------------------------------------
    def reload(self) -> UpdateResult:
        """SIGHUP: re-read the config file; a bad file keeps the old config."""
        log.info("reloading config", extra={"kv": {"file": self.opts.config_file}})
        try:
            cfg = bootstrap.load_file(self.opts.config_file)
            return self._update_static(cfg)
        except ConfigError as e:
            return self._rejected(self.opts.config_file, e.problems)

    def apply_text(self, text: str, source: str) -> UpdateResult:
        """Admin API / kmesh-cmd: replace the static config."""
        try:
            cfg = bootstrap.parse_text(text, source)
            return self._update_static(cfg)
        except ConfigError as e:
            return self._rejected(source, e.problems)

    # -- ADS --------------------------------------------------------------
    def _init_ads(self, cfg: bootstrap.LoadedConfig) -> None:
        from kmesh.xds.client import AdsClient
        from kmesh.xds.node import NodeIdentity, resolve_target
        from kmesh.xds.state import AdsState

        o = self.opts
        target = resolve_target(o.xds_address, cfg.bootstrap, o.xds_ca_file, o.xds_cert_file, o.xds_key_file)
        node = NodeIdentity.from_env(o.service_node, o.service_cluster).to_proto()
        state = AdsState(node, self._apply_xds, static=cfg)
        self.ads = AdsClient(target, state)
        log.info("ADS mode", extra={"kv": {"server": target.address, "from": target.origin, "tls": target.tls,
                                            "node": node.id}})

    def _update_static(self, cfg: bootstrap.LoadedConfig) -> UpdateResult:
        """A new static config: with the accepted xDS resources in ADS mode,
        alone in standalone mode. Raises ConfigError."""
        if self.ads:
            return self.ads.state.replace_static(cfg, functools.partial(self._write_change, cfg))
        return self._apply(cfg, translate_bootstrap(cfg))

    def _write_change(self, cfg: bootstrap.LoadedConfig, change) -> UpdateResult:
        """A static config's change (beside the accepted xDS resources) written."""
        return self._write(cfg.source, lambda: plan_changes(self._state, change.cluster_models(),
                                                            change.listener_models()), cfg=cfg)

    def _apply_xds(self, change, full_mesh) -> None:
        """Called by the ADS state with each accepted push; raising NACKs it.
        ``change`` is what the push changed; None after a restart, when the
        whole model reconciles the pinned maps."""
        if change is None:
            mesh = full_mesh()
            res = self._write("xDS", lambda: plan(self._state, mesh))
        else:
            res = self._write("xDS", lambda: plan_changes(self._state, change.cluster_models(),
                                                          change.listener_models()))
        if not res.ok:
            raise OSError("; ".join(res.errors))

    def _wait_for_control_plane(self) -> None:
        timeout = self.opts.xds_ready_timeout
        self.ads.start()
        deadline = time.monotonic() + timeout
        while not self.ads.state.synced.wait(timeout=1.0):
            left = deadline - time.monotonic()
            if left <= 0:
                self._ads_gave_up = True   # L7 serves what it has from now on
                log.warning("no full config from the control plane yet; ready with what is in the maps",
                            extra={"kv": {"server": self.ads.target.address, "waited_s": timeout,
                                          "connection": self.ads.connection["state"]}})
                return
            self._status(f"waiting for the control plane at {self.ads.target.address} "
                         f"({self.ads.connection['state']}, {left:.0f}s left)")

    def xds_status(self) -> dict:
        if not self.ads:
            return {}
        return {"server": self.ads.target.address, "server_from": self.ads.target.origin,
                "tls": self.ads.target.tls, "node": self.ads.state.node.id,
                "connection": dict(self.ads.connection), "synced": self.ads.state.synced.is_set(),
                "types": self.ads.state.as_dict()}

    def _rejected(self, source: str, problems: list[Problem]) -> UpdateResult:
        res = UpdateResult(False, source, self.version, errors=[str(p) for p in problems])
        self.last_update = res
        for p in problems:
            log.error("config rejected; the previous config stays in force", extra={"kv": {"detail": str(p)}})
        return res

    def _apply(self, cfg: bootstrap.LoadedConfig, mesh: MeshConfig) -> UpdateResult:
        """Standalone: make the maps hold ``mesh``."""
        return self._write(cfg.source, lambda: plan(self._state, mesh), cfg=cfg, mesh=mesh)

    def _write(self, source: str, make_plan, cfg: bootstrap.LoadedConfig | None = None,
               mesh: MeshConfig | None = None) -> UpdateResult:
        """Plan and write under the lock; the one path every update takes."""
        with self._lock:
            try:
                p = make_plan()
            except CapacityError as e:
                return self._rejected(source, [Problem(source, "", str(e))])
            try:
                self._maps.apply(p)
            except OSError as e:
                # What was written is consistent (see plan.py); learn it back.
                names = self._state.cluster_ids
                self._state = self._maps.read_state()
                self._state.cluster_ids = {n: i for n, i in names.items() if i in self._state.clusters}
                return self._rejected(source, [Problem(source, "", f"writing the maps failed: {e}")])
            self._state = p.commit(self._state)
            self.version += 1
            if cfg is not None:
                self.active = cfg
            if mesh is not None:
                self.mesh = mesh
            res = UpdateResult(True, source, self.version, warnings=list(mesh.warnings) if mesh else [],
                               changes=p.summary())
            self.last_update = res
            if self.l7:
                # xDS: the new mesh is readable once the ADS state commits,
                # which a lookup waits for (it holds the state's lock).
                self.l7.config_changed()
        log.log(logging.DEBUG if source == "xDS" else logging.INFO, "config applied",
                extra={"kv": {"source": source, "config_version": self.version, **p.summary()}})
        return res

    def current_mesh(self) -> MeshConfig:
        return self.ads.state.mesh() if self.ads else self.mesh

    def counts(self) -> dict[str, int]:
        if self.ads:
            return self.ads.state.counts()
        m = self.mesh
        return {"listeners": len(m.listeners), "clusters": len(m.clusters), "warnings": len(m.warnings),
                "skipped": len(m.skipped)}

    # -- what the admin API and /metrics read (kmesh.status.DaemonView) --------
    def summary(self) -> dict:
        counts = self.counts()
        return {
            "ready": self.ready, "config_version": self.version,
            "config_source": self.active.source if self.active else None,
            "listeners": counts["listeners"], "clusters": counts["clusters"],
            "mode": "ads" if self.ads else "standalone",
            "warnings": list(self.current_mesh().warnings) if counts["warnings"] else [],
            "skipped": counts["skipped"],
            "xds_connection": self.ads.connection["state"] if self.ads else None,
            "sockmap": self.sockmap_state,
            "kernel": self.features.as_dict() if self.features else None,
            "last_update": self.last_update.as_dict() if self.last_update else None,
        }

    def envoy_config(self) -> dict:
        static = self.active.to_json() if self.active else {}
        if not self.ads:
            return static
        return {"mode": "ads", "xds": self.xds_status(), "skipped": list(self.current_mesh().skipped),
                "static": static}

    def xds_connection(self) -> tuple[str, bool] | None:
        if not self.ads:
            return None
        return self.ads.target.address, self.ads.connection["state"] == "connected"

    def l7_status(self) -> dict:
        if not self.l7:
            return {"enabled": False}
        return {"enabled": True, "address": self.opts.l7_address, **self.l7.status()}

    def l7_stats(self) -> tuple | None:
        if not self.l7:
            return None
        return self.l7.totals(), self.l7.splicer.stats if self.l7.splicer else None

    def accesslog_status(self) -> dict:
        return self.accesslog.status() if self.accesslog else {"enabled": False}

    def set_accesslog(self, on: bool) -> dict | None:
        if not self.accesslog:
            return None
        self.accesslog.set(on)
        return self.accesslog.status()

    def cluster_names(self) -> dict[int, str]:
        """Cluster ids to names, the ids of IPv6 views too."""
        out = {}
        for name, cid in self._state.cluster_ids.items():
            out[cid] = out[cid | records.CLUSTER_V6] = name
        return out

    # -- L7 -------------------------------------------------------------------
    def _start_l7(self, dp: loader.Dataplane) -> None:
        from kmesh.l7 import fdstore

        if not self.opts.l7_address:
            self.kconfig.set(l7_handoff=records.KmeshAddr())
            for name, fd in fdstore.received().items():   # spliced by a daemon with L7 on: they end now
                fdstore.remove([name])
                os.close(fd)
            return
        from kmesh.l7.handoff import Handoff   # late: httptools and asyncio only when used
        from kmesh.l7.splice import Splicer
        from kmesh.l7.targets import Targets

        ip, port = split_address(self.opts.l7_address)
        if ":" in ip:
            # connect4 can only send a connection to an IPv4 address; IPv6
            # clients reach an IPv4 one in its mapped form.
            raise StartError(f"-l7-address {self.opts.l7_address}: the hand-off listener needs an IPv4 address "
                             "(IPv6 clients reach it too); choose one such as 127.0.0.1:15006")
        splicer = None
        # Without the splice verdict (an older kernel) the daemon relays.
        if self.opts.l7_splice_budget and self.features.on("l7_splice"):
            splicer = Splicer(dp.maps[mapnames.SPLICE], dp.maps[mapnames.SPLICE_DIR], dp.maps[mapnames.SPLICE_RELAYED],
                              self.opts.l7_splice_budget)
        targets = Targets(self.current_mesh, lambda: self.ads is not None and not self.ads.state.synced.is_set()
                          and not self._ads_gave_up)
        self.l7 = Handoff((ip, port), dp.maps[mapnames.ORIG_DST], targets, splicer,
                          max_waiting=self.opts.l7_max_waiting_heads, native=self.opts.l7_engine == "native")
        try:
            self.l7.start()
        except OSError as e:
            raise StartError(f"L7 hand-off listener {self.opts.l7_address}: {e} "
                             "(another kmesh-daemon? choose another -l7-address, or -l7-address= to turn L7 off)") \
                from None
        # Before connections are handed off: adopting also drops the state of
        # pairs that are gone, which must not catch a pair being set up.
        self.l7.adopt(fdstore.received())
        self._open_workload_listeners()
        self.kconfig.set(l7_handoff=records.addr_key(ip, port))

    def policy_state(self) -> tuple[list, list]:
        """(clusters, listeners) with a traffic policy, and what it holds now."""
        if not self._dataplane:
            return [], []
        with self._lock:
            ids = dict(self._state.cluster_ids)
        return policy_state.read(self.current_mesh(), ids, self._dataplane.maps)

    def bpf_maps(self) -> dict:
        """The loaded maps by name (empty before load)."""
        return self._dataplane.maps if self._dataplane else {}

    def map_entries(self) -> dict[str, tuple[int, int]]:
        """Config map -> (records, capacity), from what the daemon wrote."""
        st = self._state
        return {mapnames.LISTENER: (len(st.listeners), records.KMESH_MAX_LISTENERS),
                mapnames.CLUSTER: (len(st.clusters), records.KMESH_MAX_CLUSTERS)}

    def programs_attached(self) -> dict[str, bool]:
        return self._dataplane.attached() if self._dataplane else {}

    def program_stats(self) -> dict[str, tuple[int, int]]:
        return self._dataplane.program_stats() if self._dataplane else {}

    def set_log_level(self, level: str) -> str:
        kmlog.set_level(level)   # ValueError names the levels
        log.warning("log level changed", extra={"kv": {"level": level}})
        return level

    def dump_maps(self) -> dict:
        with self._lock:
            return self._maps.dump(self.cluster_names()) if self._maps else {}
