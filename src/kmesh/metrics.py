"""/metrics: the BPF counters and the daemon's health, in Prometheus' text
format (prometheus-client does the exposition).

The counters live in per-CPU BPF maps bumped by connect4 (opened) and, for
tracked sockets, by the sockops program when TCP reaches CLOSE (closed,
failed, bytes) or by sock_release for a socket that never sent a SYN; they
are read and summed only when scraped, so an idle scraper costs the data
path nothing. Names and labels follow Istio's TCP metrics
(``istio_tcp_connections_opened_total``, ``istio_tcp_received_bytes_total``:
bytes from the client, ``istio_tcp_sent_bytes_total``: bytes to it).
Bytes are what went through TCP: same-host acceleration hands messages
over without it, and those are not counted.
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kmesh import limits
from kmesh.bpf import mapnames, records
from kmesh.status import DaemonView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_DECISIONS = {records.Stat.REDIRECTS: "redirect", records.Stat.NO_LISTENER: "no_listener",
              records.Stat.NO_CLUSTER: "no_cluster", records.Stat.NO_ENDPOINT: "no_endpoint",
              records.Stat.L7_HANDOFFS: "l7_handoff", records.Stat.UNGOVERNED: "ungoverned",
              records.Stat.L7_NO_NETNS: "l7_no_netns"}


class DaemonCollector:
    """Reads a running Daemon at scrape time."""

    def __init__(self, daemon: DaemonView):
        self.d = daemon

    def collect(self) -> Iterator:
        yield from self._health()
        maps = self.d.bpf_maps()
        if maps:
            yield from self._decisions(maps[mapnames.STATS])
            closes = self.d.opts.track_connections
            yield from self._listeners(maps[mapnames.STATS_LISTENER], closes)
            yield from self._endpoints(maps[mapnames.STATS_ENDPOINT], closes)
            yield from self._policies()

    # -- the daemon -----------------------------------------------------------
    def _health(self) -> Iterator:
        d = self.d
        g = GaugeMetricFamily("kmesh_config_version", "Config version in force (applied updates).")
        g.add_metric([], d.version)
        yield g
        last = d.last_update
        g = GaugeMetricFamily("kmesh_config_last_update_timestamp_seconds", "When the last update was tried.")
        g.add_metric([], last.time if last else 0)
        yield g
        g = GaugeMetricFamily("kmesh_config_last_update_success", "1 if the last update was applied, 0 if refused.",
                              labels=["source"])
        if last:
            g.add_metric([last.source], 1 if last.ok else 0)
        yield g
        c = CounterMetricFamily("kmesh_limit_hits", "Times a resource limit bit (kmesh.limits: a request too big, "
                                "too many at once, a peer too slow...).", labels=["limit"])
        for name, n in limits.hits().items():
            c.add_metric([name], n)
        yield c
        g = GaugeMetricFamily("kmesh_ready", "1 once the programs are attached and the config applied.")
        g.add_metric([], 1 if d.ready else 0)
        yield g
        xds = d.xds_connection()
        if xds is not None:
            g = GaugeMetricFamily("kmesh_xds_connected", "1 while the xDS stream is up.", labels=["server"])
            g.add_metric([xds[0]], 1 if xds[1] else 0)
            yield g
        counts = d.map_entries()
        g = GaugeMetricFamily("kmesh_map_entries", "Records in a config map.", labels=["map"])
        c = GaugeMetricFamily("kmesh_map_capacity", "Records a config map can hold.", labels=["map"])
        for name, (n, cap) in counts.items():
            g.add_metric([name], n)
            c.add_metric([name], cap)
        yield g
        yield c
        g = GaugeMetricFamily("kmesh_bpf_program_attached", "1 if the program is attached (pinned link).",
                              labels=["program"])
        for prog, on in d.programs_attached().items():
            g.add_metric([prog], 1 if on else 0)
        yield g
        runs = CounterMetricFamily("kmesh_bpf_program_runs", "Program runs, counted while BPF stats are on "
                                   "(-bpf-stats, or sysctl kernel.bpf_stats_enabled=1).", labels=["program"])
        secs = CounterMetricFamily("kmesh_bpf_program_run_seconds", "Time in the program, counted while BPF "
                                   "stats are on.", labels=["program"])
        for prog, (n, ns) in d.program_stats().items():
            runs.add_metric([prog], n)
            secs.add_metric([prog], ns / 1e9)
        yield runs
        yield secs
        l7 = d.l7_stats()
        if l7 is not None:
            yield from _l7_families(*l7)
        st = d.accesslog_status()
        if "written" in st:   # the access log is loaded
            c = CounterMetricFamily("kmesh_access_log_lines", "Access log lines written.")
            c.add_metric([], st["written"])
            yield c
            c = CounterMetricFamily("kmesh_access_log_dropped", "Access log records dropped.", labels=["reason"])
            c.add_metric(["rate_limit"], st["rate_dropped"])
            c.add_metric(["ring_buffer_full"], st["ring_buffer_dropped"])
            yield c
        sm = d.sockmap_status()
        g = GaugeMetricFamily("kmesh_sockmap_sockets", "Sockets enrolled for same-host acceleration.",
                              labels=["state"])
        g.add_metric([sm["state"]], sm["sockets"])
        yield g

    # -- the data path ----------------------------------------------------------
    def _decisions(self, m) -> Iterator:
        c = CounterMetricFamily("kmesh_connects", "TCP connects seen by connect4, by what it decided.",
                                labels=["decision"])
        for idx, decision in _DECISIONS.items():
            c.add_metric([decision], m.sum(records.ctypes.c_uint32(idx)) or 0)
        yield c

    def _listeners(self, m, closes: bool) -> Iterator:
        rows = [([records.addr_text(key)], m.sum(key)) for key in list(m.keys())]
        yield from _conn_families("kmesh_listener", ["listener"], rows, closes)
        limited = CounterMetricFamily("kmesh_listener_rate_limited", "Connects refused by the listener's local "
                                      "rate limit (Envoy: local_rate_limit rate_limited).", labels=["listener"])
        for values, v in rows:
            if v is not None and v.rate_limited:
                limited.add_metric(values, v.rate_limited)
        yield limited

    def _policies(self) -> Iterator:
        clusters, _ = self.d.policy_state()
        cap = GaugeMetricFamily("kmesh_cluster_max_connections", "The cluster's circuit breaker: connections "
                                "open at once, at most.", labels=["cluster"])
        held = GaugeMetricFamily("kmesh_cluster_connections_active", "Connections holding a max_connections slot.",
                                 labels=["cluster"])
        overflow = CounterMetricFamily("kmesh_cluster_overflow", "Connects refused by max_connections "
                                       "(Envoy: upstream_cx_overflow).", labels=["cluster"])
        ejections = CounterMetricFamily("kmesh_cluster_outlier_ejections", "Endpoints ejected by outlier "
                                        "detection (Envoy: outlier_detection.ejections_enforced_total).",
                                        labels=["cluster"])
        ejected = GaugeMetricFamily("kmesh_endpoint_ejected", "1 while outlier detection keeps the endpoint "
                                    "out of its cluster's load balancing.", labels=["cluster", "endpoint"])
        for c in clusters:
            if c.policy.max_connections:
                cap.add_metric([c.name], c.policy.max_connections)
                held.add_metric([c.name], c.active)
                overflow.add_metric([c.name], c.overflow)
            if c.policy.outlier_failures:
                ejections.add_metric([c.name], c.ejections)
                for ep in c.ejected:
                    ejected.add_metric([c.name, ep], 1)
        yield from (cap, held, overflow, ejections, ejected)

    def _endpoints(self, m, closes: bool) -> Iterator:
        """Per (cluster, endpoint); closed, failed, bytes and active only when
        closes are counted (-track-connections)."""
        names = self.d.cluster_names()

        def rows():
            for key in list(m.keys()):
                if key.cluster_id == 0:
                    continue   # connections handed to the L7 listener: counted per listener
                cluster = names.get(key.cluster_id, f"#{key.cluster_id}")
                yield [destination_service(cluster), cluster, records.addr_text(key.ep)], m.sum(key)
        yield from _conn_families("kmesh_tcp", ["destination_service", "destination_cluster", "endpoint"],
                                  rows(), closes)


# (suffix, help, KmeshConnCounters field); the first one is counted always.
_CONN_COUNTERS = (
    ("connections_opened", "Connections redirected.", "opened"),
    ("connections_closed", "Of those, closed (failed ones included).", "closed"),
    ("connections_failed", "Of the closed, never established (refused, unreachable, timed out).", "failed"),
    ("received_bytes", "Bytes the clients sent (through TCP).", "bytes_to_ep"),
    ("sent_bytes", "Bytes the clients received (through TCP).", "bytes_from_ep"),
)


def _conn_families(prefix: str, labels: list[str], rows, closes: bool) -> Iterator:
    """Counter families (and the active gauge) from (label values,
    KmeshConnCounters) rows."""
    fams = [CounterMetricFamily(f"{prefix}_{suffix}", text, labels=labels) for suffix, text, _ in _CONN_COUNTERS]
    active = GaugeMetricFamily(f"{prefix}_connections_active", "Opened and not yet closed.", labels=labels)
    for values, v in rows:
        if v is None:
            continue
        for fam, (_, _, field) in zip(fams, _CONN_COUNTERS):
            fam.add_metric(values, getattr(v, field))
        active.add_metric(values, max(0, v.opened - v.closed))
    yield fams[0]
    if closes:
        yield from fams[1:]
        yield active


def _l7_families(st, sp) -> Iterator:
    """The hand-off listener's counters (kmesh.l7.handoff.Stats, and
    kmesh.l7.splice.SpliceStats when it splices)."""
    spliced = () if sp is None else (
        ("kmesh_l7_connections_spliced", "Routed connections spliced in the kernel.", sp.spliced),
        ("kmesh_l7_connections_not_spliced", "Routed connections the kernel would not splice (closed before, "
         "map full): relayed by the daemon.", sp.not_spliceable),
        ("kmesh_l7_passed_bytes", "Bytes of spliced connections relayed by the daemon because a reader fell "
         "behind by more than -l7-splice-budget.", sp.passed_bytes),
        ("kmesh_l7_repeated_bytes", "Bytes of closed spliced connections the kernel handed over twice (a "
         "retransmission overlapping delivered bytes) and the verdict dropped.", sp.repeated_bytes))
    if sp is not None:
        yield GaugeMetricFamily("kmesh_l7_spliced_active", "Spliced connections open now.", value=sp.active)
    for name, text, value in (*spliced,
            ("kmesh_l7_connections_accepted", "Connections the L7 hand-off listener accepted.", st.accepted),
            ("kmesh_l7_requests_routed", "Requests routed to an upstream (a spliced connection's first, and each "
             "one on a keep-alive connection).", st.routed),
            ("kmesh_l7_connections_per_request", "Keep-alive connections routed request by request.",
             st.per_request),
            ("kmesh_l7_upstream_failures", "Requests answered 503: no endpoint could be connected.",
             st.upstream_failures),
            ("kmesh_l7_bad_requests", "Connections whose first bytes were no HTTP/1.x request head.",
             st.bad_requests)):
        c = CounterMetricFamily(name, text)
        c.add_metric([], value)
        yield c
    c = CounterMetricFamily("kmesh_l7_responses", "Responses the hand-off listener gave itself (no route, direct "
                            "response, redirect, fault abort, errors), by status.", labels=["code"])
    for code, n in sorted(st.answered.items()):
        c.add_metric([str(code)], n)
    yield c


def destination_service(cluster: str) -> str:
    """The service a cluster stands for: the host of an Istio cluster name
    (``outbound|80||reviews.default.svc.cluster.local``), else the name."""
    parts = cluster.split("|")
    return parts[3] if len(parts) == 4 and parts[3] else cluster


def registry_for(daemon: DaemonView) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DaemonCollector(daemon))
    return reg


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
