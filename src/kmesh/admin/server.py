"""Admin API: readiness, options, decoded maps, the active config, and
replacing the static config. Plain http.server: a handful of JSON endpoints
need nothing more.

Who may do what (README, Security):
- the Unix socket (-admin-socket, mode 0660, group -admin-group): the whole
  API; a change needs the peer to be root or in the admin group, as
  SO_PEERCRED/SO_PEERGROUPS say (kmeshctl and kmesh-cmd use it);
- loopback TCP (-admin-address): every GET; a change only from a socket
  root owns (sock_diag), so `curl -X POST` as root keeps working and any
  other local user gets 403;
- -metrics-address: GET /metrics and nothing else.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import socketserver
import stat
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kmesh import __version__, limits, memory, metrics
from kmesh.admin import peer as peers
from kmesh.options import split_address
from kmesh.status import DaemonView

log = logging.getLogger("kmesh.admin")

MAX_CONFIG_BYTES = limits.ADMIN_BODY.value
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
    "(every POST)": "changes: root (any listener) or -admin-group (the admin socket) only; 403 otherwise",
}


def _query(path: str) -> dict[str, str]:
    return {k: urllib.parse.unquote(v) for k, v in
            (p.split("=", 1) for p in (path.split("?", 1) + [""])[1].split("&") if "=" in p)}


class _Base(BaseHTTPRequestHandler):
    server_version = f"kmesh-admin/{__version__}"
    timeout = limits.ADMIN_IDLE.value   # a silent client loses its connection (and its slot)
    daemon: DaemonView   # set per server class

    def address_string(self) -> str:
        return self.client_address[0] if self.client_address else "unix"

    def log_message(self, fmt, *args):  # quiet: requests at debug level
        log.debug("request", extra={"kv": {"client": self.address_string(), "line": fmt % args}})

    def log_error(self, fmt, *args):
        if fmt.startswith("Request timed out"):
            limits.hit(limits.ADMIN_IDLE)
        self.log_message(fmt, *args)

    def send_error(self, code, message=None, explain=None):
        if code in (414, 431):   # http.server's line and header limits
            limits.hit(limits.ADMIN_HEAD)
        super().send_error(code, message, explain)

    def _length(self) -> int:
        """Content-Length, or -1 when it is no number."""
        got = (self.headers.get("Content-Length") or "0").strip()
        return int(got) if got.isdigit() else -1

    def _metrics(self) -> None:
        server = self.server
        if getattr(server, "registry", None) is None:
            server.registry = metrics.registry_for(self.daemon)
        self._send(200, metrics.exposition(server.registry).decode(), metrics.CONTENT_TYPE)

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


class _MetricsHandler(_Base):
    """-metrics-address: /metrics and nothing else."""

    def do_GET(self):  # noqa: N802
        if self.path.split("?", 1)[0].rstrip("/") == "/metrics":
            self._metrics()
        else:
            self._send(404, {"error": "this listener serves /metrics only"})


class _Handler(_Base):
    group = None     # the admin group's gid (None: root only)

    def peer(self) -> peers.Peer | None:
        if self.server.address_family == socket.AF_UNIX:
            return peers.unix_peer(self.connection)
        return peers.tcp_peer(self.client_address, self.server.server_address)

    def _may_change(self) -> bool:
        """A change needs root or the admin group, as the kernel says; 403
        otherwise (its body is read and dropped)."""
        try:
            who = self.peer()
        except OSError as e:
            who, why = None, f"the caller could not be identified ({e})"
        else:
            why = "the caller's socket is gone"
        if who is not None and who.may_change(self.group):
            return True
        if who is not None:
            sock = self.daemon.opts.admin_socket
            why = (f"uid {who.uid} may not change kmesh: only root" +
                   (f" or group {self.daemon.opts.admin_group}" if self.group is not None else "") +
                   (f" (over {sock}: kmeshctl and kmesh-cmd use it)" if who.via == "tcp" and sock else ""))
        log.warning("admin change refused", extra={"kv": {"request": self.requestline, "reason": why}})
        self._drain()
        self._send(403, {"error": why})
        return False

    def _drain(self) -> None:
        """Read (and drop) a refused request's body, so that the client
        reads the answer instead of a reset."""
        self.close_connection = True
        length = self._length()
        if 0 < length <= MAX_CONFIG_BYTES:
            while length > 0:
                got = self.rfile.read(min(length, 1 << 16))
                if not got:
                    break
                length -= len(got)

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
            self._send(200, d.summary())
        elif path == "/bpf/kmesh/maps":
            self._send(200, d.dump_maps())
        elif path == "/policies":
            clusters, listeners = d.policy_state()
            self._send(200, {"clusters": {c.name: c.as_dict() for c in clusters},
                             "listeners": {x.address: x.as_dict() for x in listeners}})
        elif path == "/l7":
            self._send(200, d.l7_status())
        elif path == "/sockmap":
            self._send(200, d.sockmap_status())
        elif path == "/workloads":
            self._send(200, d.workloads())
        elif path == "/accesslog":
            self._send(200, d.accesslog_status())
        elif path == "/metrics":
            self._metrics()
        elif path == "/controller/envoy":
            self._send(200, d.envoy_config())
        else:
            self._send(404, {"error": f"no such endpoint {path}; see /help"})

    def do_POST(self):  # noqa: N802
        if not self._may_change():
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/logging":
            try:
                self._send(200, {"level": self.daemon.set_log_level(_query(self.path).get("level", ""))})
            except ValueError as e:
                self._send(400, {"error": str(e)})
            return
        if path in ("/accesslog/on", "/accesslog/off"):
            st = self.daemon.set_accesslog(path.endswith("/on"))
            if st is None:
                self._send(503, {"error": "the data path is not loaded yet"})
            else:
                self._send(200, st)
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
        length = self._length()
        if length > MAX_CONFIG_BYTES:
            limits.hit(limits.ADMIN_BODY)
        if length <= 0 or length > MAX_CONFIG_BYTES:
            self.close_connection = True
            self._send(400, {"result": "rejected", "errors": [f"body must be 1..{MAX_CONFIG_BYTES} bytes of config"]})
            return
        text = self.rfile.read(length).decode("utf-8", errors="replace")
        source = self.headers.get("X-Kmesh-Source") or "admin API"
        res = self.daemon.apply_text(text, source)
        self._send(200 if res.ok else 400, res.as_dict())


class _Bounded:
    """At most ``slots`` requests served at once per listener; more are
    answered 503 at once (and counted) instead of queueing threads."""

    daemon_threads = True

    def __init__(self, *args, **kw):
        self.slots = threading.BoundedSemaphore(limits.ADMIN_CONCURRENT.value)
        super().__init__(*args, **kw)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            limits.hit(limits.ADMIN_CONCURRENT)
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                b"Content-Length: 26\r\n\r\ntoo many admin requests\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        import sys

        log.warning("admin request failed", extra={"kv": {"client": client_address or "unix",
                                                          "error": repr(sys.exc_info()[1])}})

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _TCPServer(_Bounded, ThreadingHTTPServer):
    pass


class _TCPServer6(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(_Bounded, socketserver.ThreadingUnixStreamServer):
    def server_bind(self):
        self.inode = bind_unix(self.socket, self.server_address, self.gid)


def bind_unix(sock: socket.socket, path: str, gid: int) -> int:
    """Bind ``sock`` at ``path``, mode 0660 from the start, group ``gid``;
    a stale socket is replaced, a live one (another daemon) is not."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is no socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(path) == 0:
                raise OSError(errno.EADDRINUSE, f"another kmesh-daemon serves {path}")
        os.unlink(path)
    old = os.umask(0o117)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chown(path, 0, gid)
    os.chmod(path, 0o660)
    return os.stat(path).st_ino


def _listen(server_cls, address, handler, what: str, flag: str):
    try:
        return server_cls(address, handler)
    except OSError as e:
        raise OSError(e.errno, f"{what} cannot listen on {address}: {e.strerror} (choose another with {flag})") \
            from None


class AdminServer:
    """The admin listeners: loopback TCP, the Unix socket, /metrics; each
    optional ("" turns it off), each with its own thread and request slots."""

    def __init__(self, daemon: DaemonView, address: str, socket_path: str = "", group: str = "", metrics_address: str = ""):
        gid = resolve_group(group)
        handler = type("Handler", (_Handler,), {"daemon": daemon, "group": gid})
        self._servers = []
        self.address = self.socket = self.metrics_address = ""
        try:
            if address:
                self._servers.append(self._tcp(address, handler, "admin API", "-admin-address"))
                self.address = self._bound(self._servers[-1])
            if socket_path:
                cls = type("UnixServer", (_UnixServer,), {"gid": gid or 0})
                self._servers.append(_listen(cls, socket_path, handler, "admin socket", "-admin-socket"))
                self.socket = socket_path
            if metrics_address:
                mh = type("MetricsHandler", (_MetricsHandler,), {"daemon": daemon})
                self._servers.append(self._tcp(metrics_address, mh, "metrics listener", "-metrics-address"))
                self.metrics_address = self._bound(self._servers[-1])
        except OSError:
            self.stop()
            raise
        self._threads = [threading.Thread(target=s.serve_forever, name=f"admin-{i}", daemon=True)
                         for i, s in enumerate(self._servers)]

    @staticmethod
    def _tcp(address: str, handler, what: str, flag: str):
        host, port = split_address(address)
        cls = _TCPServer6 if ":" in host else _TCPServer
        return _listen(cls, (host, port), handler, what, flag)

    @staticmethod
    def _bound(srv) -> str:
        host, port = srv.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        started = any(t.is_alive() for t in getattr(self, "_threads", ()))
        for s in self._servers:
            if started:
                s.shutdown()
            s.server_close()
            if s.address_family == socket.AF_UNIX:
                try:   # ours still: a later daemon may have replaced it
                    if os.stat(s.server_address).st_ino == s.inode:
                        os.unlink(s.server_address)
                except FileNotFoundError:
                    pass


def resolve_group(group: str) -> int | None:
    """The admin group's gid (None: root only). A number or a name."""
    if not group:
        return None
    if group.isdigit():
        return int(group)
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise OSError(errno.ENOENT, f"-admin-group {group}: no such group") from None
