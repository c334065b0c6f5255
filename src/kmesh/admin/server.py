"""Admin API: readiness, options, decoded maps, the active config, and
replacing the static config. Plain http.server: a handful of JSON endpoints
on loopback need nothing more."""
from __future__ import annotations

import json
import urllib.parse
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kmesh import __version__, memory, metrics
from kmesh.options import split_address

log = logging.getLogger("kmesh.admin")

MAX_CONFIG_BYTES = 16 * 1024 * 1024
TRIM_AFTER_BYTES = 1 << 20

HELP = {
    "GET /help": "this list",
    "GET /version": "kmesh version",
    "GET /options": "the daemon's options",
    "GET /ready": "200 once programs are attached and the config applied, else 503",
    "GET /status": "config version, last update result, warnings",
    "GET /bpf/kmesh/maps": "BPF map contents decoded to JSON",
    "GET /controller/envoy": "the active config as Envoy JSON; in ADS mode also the xDS state per type "
                             "(versions, nonces, last ACK/NACK, connection) and what was skipped and why",
    "POST /controller/envoy": "replace the static config (YAML or JSON body; header X-Kmesh-Source names it)",
    "GET /metrics": "Prometheus metrics: connects by decision, per listener and per cluster/endpoint "
                    "connections, config and xDS health, map fill, programs",
    "POST /logging?level=LEVEL": "change the log level at runtime (debug, info, warn, error)",
    "GET /accesslog": "access log state: on or off, where it goes, lines written and dropped",
    "POST /accesslog/on, /accesslog/off": "switch the access log at runtime",
    "GET /policies": "traffic policies in force: per cluster the limits, slots held, refusals and ejected "
                     "endpoints; per listener the rate limit and tokens left",
    "GET /l7": "the L7 hand-off listener: address, connections accepted, routed, answered here by status, "
              "spliced in the kernel",
    "GET /sockmap": "same-host acceleration: state (on, off, draining) and sockets enrolled",
    "POST /sockmap/on, /sockmap/off": "turn same-host acceleration on or off at runtime",
    "GET /workloads": "workloads enrolled and bypassed (by cgroup or network namespace), and the namespaces the L7 "
                      "hand-off listens in",
    "POST /workloads/enroll|bypass|unenroll?cgroup=PATH|unit=NAME|pid=N|netns=PATH":
        "enroll a workload (governed), bypass it (never governed, even inside an enrolled one) or forget it; "
        "pid names the process's namespace when it has one of its own, else its cgroup",
}


def _query(path: str) -> dict[str, str]:
    return {k: urllib.parse.unquote(v) for k, v in
            (p.split("=", 1) for p in (path.split("?", 1) + [""])[1].split("&") if "=" in p)}


class _Handler(BaseHTTPRequestHandler):
    server_version = f"kmesh-admin/{__version__}"
    daemon = None  # set per server class
    registry = None  # the /metrics registry, made on first scrape

    def log_message(self, fmt, *args):  # quiet: requests at debug level
        log.debug("request", extra={"kv": {"client": self.client_address[0], "line": fmt % args}})

    def _send(self, status: int, body, content_type: str = "application/json") -> None:
        data = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode() if content_type == "application/json" \
            else str(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if len(data) >= TRIM_AFTER_BYTES:
            # A dump of a big mesh (tens of thousands of notes) is built and
            # dropped; give the heap back instead of keeping its peak.
            data = body = None
            memory.trim()

    def do_GET(self):  # noqa: N802
        d = self.daemon
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path in ("/", "/help"):
            self._send(200, "\n".join(f"{k:28} {v}" for k, v in HELP.items()) + "\n", "text/plain")
        elif path == "/version":
            self._send(200, {"version": __version__})
        elif path == "/options":
            self._send(200, d.opts.as_dict())
        elif path == "/ready":
            if d.ready:
                self._send(200, "ready\n", "text/plain")
            else:
                self._send(503, "not ready\n", "text/plain")
        elif path == "/status":
            counts = d.counts()
            self._send(200, {
                "ready": d.ready, "config_version": d.version,
                "config_source": d.active.source if d.active else None,
                "listeners": counts["listeners"], "clusters": counts["clusters"],
                "mode": "ads" if d.ads else "standalone",
                "warnings": list(d.current_mesh().warnings) if counts["warnings"] else [],
                "skipped": counts["skipped"],
                "xds_connection": d.ads.connection["state"] if d.ads else None,
                "sockmap": d.sockmap_state,
                "kernel": d.features.as_dict() if d.features else None,
                "last_update": d.last_update.as_dict() if d.last_update else None,
            })
        elif path == "/bpf/kmesh/maps":
            self._send(200, d.dump_maps())
        elif path == "/policies":
            clusters, listeners = d.policy_state()
            self._send(200, {"clusters": {c.name: c.as_dict() for c in clusters},
                             "listeners": {x.address: x.as_dict() for x in listeners}})
        elif path == "/l7":
            self._send(200, {"enabled": True, "address": d.opts.l7_address, **d.l7.status()} if d.l7
                       else {"enabled": False})
        elif path == "/sockmap":
            self._send(200, d.sockmap_status())
        elif path == "/workloads":
            self._send(200, d.workloads())
        elif path == "/accesslog":
            self._send(200, d.accesslog.status() if d.accesslog else {"enabled": False})
        elif path == "/metrics":
            if self.registry is None:
                type(self).registry = metrics.registry_for(d)
            self._send(200, metrics.exposition(self.registry).decode(), metrics.CONTENT_TYPE)
        elif path == "/controller/envoy":
            static = d.active.to_json() if d.active else {}
            if d.ads:
                self._send(200, {"mode": "ads", "xds": d.xds_status(), "skipped": list(d.current_mesh().skipped),
                                 "static": static})
            else:
                self._send(200, static)
        else:
            self._send(404, {"error": f"no such endpoint {path}; see /help"})

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/logging":
            try:
                self._send(200, {"level": self.daemon.set_log_level(_query(self.path).get("level", ""))})
            except ValueError as e:
                self._send(400, {"error": str(e)})
            return
        if path in ("/accesslog/on", "/accesslog/off"):
            if not self.daemon.accesslog:
                self._send(503, {"error": "the data path is not loaded yet"})
                return
            self.daemon.accesslog.set(path.endswith("/on"))
            self._send(200, self.daemon.accesslog.status())
            return
        if path in ("/workloads/enroll", "/workloads/bypass", "/workloads/unenroll"):
            query = _query(self.path)
            try:
                self._send(200, self.daemon.enroll(path.rsplit("/", 1)[1], query))
            except ValueError as e:
                self._send(400, {"error": str(e)})
            except OSError as e:
                self._send(409, {"error": str(e)})
            return
        if path in ("/sockmap/on", "/sockmap/off"):
            try:
                self._send(200, self.daemon.set_sockmap(path.endswith("/on")))
            except OSError as e:
                self._send(500, {"error": str(e)})
            return
        if path != "/controller/envoy":
            self._send(404, {"error": f"no such endpoint {path}; see /help"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_CONFIG_BYTES:
            self._send(400, {"result": "rejected", "errors": [f"body must be 1..{MAX_CONFIG_BYTES} bytes of config"]})
            return
        text = self.rfile.read(length).decode("utf-8", errors="replace")
        source = self.headers.get("X-Kmesh-Source") or "admin API"
        res = self.daemon.apply_text(text, source)
        self._send(200 if res.ok else 400, res.as_dict())


class AdminServer:
    def __init__(self, daemon, address: str):
        host, port = split_address(address)
        handler = type("Handler", (_Handler,), {"daemon": daemon})
        try:
            self._httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise OSError(e.errno, f"admin API cannot listen on {address}: {e.strerror} "
                                   "(choose another with -admin-address)") from None
        self._httpd.daemon_threads = True
        self.address = f"{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="admin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
