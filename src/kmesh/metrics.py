"""/metrics: the BPF counters and the daemon's health, in Prometheus' text
format (prometheus-client does the exposition).

The counters live in per-CPU BPF maps bumped by connect4 and sock_release;
they are read and summed only when scraped, so an idle scraper costs the
data path nothing. Names follow Istio's TCP metrics where one exists
(``*_connections_opened_total`` / ``*_closed_total``).
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kmesh.bpf import records

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_DECISIONS = {records.Stat.REDIRECTS: "redirect", records.Stat.NO_LISTENER: "no_listener",
              records.Stat.NO_CLUSTER: "no_cluster", records.Stat.NO_ENDPOINT: "no_endpoint"}


class DaemonCollector:
    """Reads a running Daemon at scrape time."""

    def __init__(self, daemon):
        self.d = daemon

    def collect(self) -> Iterator:
        yield from self._health()
        maps = self.d.bpf_maps()
        if maps:
            yield from self._decisions(maps["km_stats"])
            yield from self._listeners(maps["km_stats_listener"])
            yield from self._endpoints(maps["km_stats_endpoint"], self.d.opts.track_connections)

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
        g = GaugeMetricFamily("kmesh_ready", "1 once the programs are attached and the config applied.")
        g.add_metric([], 1 if d.ready else 0)
        yield g
        if d.ads:
            g = GaugeMetricFamily("kmesh_xds_connected", "1 while the xDS stream is up.", labels=["server"])
            g.add_metric([d.ads.target.address], 1 if d.ads.connection["state"] == "connected" else 0)
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
        if d.accesslog:
            st = d.accesslog.status()
            c = CounterMetricFamily("kmesh_access_log_lines", "Access log lines written.")
            c.add_metric([], st["written"])
            yield c
            c = CounterMetricFamily("kmesh_access_log_dropped", "Access log records dropped.", labels=["reason"])
            c.add_metric(["rate_limit"], st["rate_dropped"])
            stats = d.bpf_maps().get("km_stats")
            c.add_metric(["ring_buffer_full"],
                         (stats.sum(records.ctypes.c_uint32(records.Stat.EVENTS_DROPPED)) or 0) if stats else 0)
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

    def _listeners(self, m) -> Iterator:
        c = CounterMetricFamily("kmesh_listener_redirects", "Connects to a listener address redirected.",
                                labels=["listener"])
        for key in list(m.keys()):
            c.add_metric([records.addr_text(key)], m.sum(key) or 0)
        yield c

    def _endpoints(self, m, closes: bool) -> Iterator:
        """Opened per (cluster, endpoint); closed and active only when closes
        are counted (-track-connections)."""
        names = self.d.cluster_names()
        opened = CounterMetricFamily("kmesh_tcp_connections_opened", "Connections redirected to an endpoint.",
                                     labels=["destination_cluster", "endpoint"])
        closed = CounterMetricFamily("kmesh_tcp_connections_closed", "Of those, sockets closed.",
                                     labels=["destination_cluster", "endpoint"])
        active = GaugeMetricFamily("kmesh_tcp_connections_active", "Opened and not yet closed.",
                                   labels=["destination_cluster", "endpoint"])
        for key in list(m.keys()):
            v = m.sum(key)
            if v is None:
                continue
            labels = [names.get(key.cluster_id, f"#{key.cluster_id}"), records.addr_text(key.ep)]
            opened.add_metric(labels, v.opened)
            closed.add_metric(labels, v.closed)
            active.add_metric(labels, max(0, v.opened - v.closed))
        yield opened
        if closes:
            yield closed
            yield active


def registry_for(daemon) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DaemonCollector(daemon))
    return reg


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
