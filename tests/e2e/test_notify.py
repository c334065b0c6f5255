"""The daemon's side of Type=notify, against a fake NOTIFY_SOCKET: READY=1
only once the config is in the maps and the programs are attached,
WATCHDOG=1 pings, STOPPING=1 on SIGTERM, all from the daemon's own PID."""
from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time

from tests.e2e.test_l4 import vip
from tests.support import harness
from tests.support.envoy import bootstrap, cluster, lb_ep, tcp_listener

_CREDS = struct.calcsize("3i")


class FakeSystemd:
    """An AF_UNIX datagram socket that records (time, sender pid, message),
    and on READY=1 records what the maps held at that moment."""

    def __init__(self, path, on_ready):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, int, str]] = []
        self.at_ready = None
        self._on_ready = on_ready
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CREDS))
            except socket.timeout:
                continue
            pid = next((struct.unpack("3i", d[:_CREDS])[0] for lvl, typ, d in anc
                        if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS), -1)
            text = data.decode()
            if "READY=1" in text.split("\n") and self.at_ready is None:
                self.at_ready = self._on_ready()
            self.messages.append((time.monotonic(), pid, text))

    def lines(self, pid: int | None = None) -> list[str]:
        return [line for _, p, text in self.messages if pid is None or p == pid for line in text.split("\n") if line]

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_ready_watchdog_and_stopping(kmesh, cgroup, backends, tmp_path):
    (a,) = backends("A")
    v = vip()
    holder = {}

    def snapshot():
        k = holder["k"]
        out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(k.pin_root / "map" / "km_listener")],
                             capture_output=True, text=True).stdout
        return {"listeners": len(json.loads(out or "[]")), "programs": sorted(k.attached_programs())}

    fake = FakeSystemd(tmp_path / "notify", snapshot)
    try:
        # (Python start-up alone takes longer than setting holder does.)
        holder["k"] = k = kmesh(bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr))]),
                                env={"NOTIFY_SOCKET": fake.path, "WATCHDOG_USEC": "400000"}, wait=False)
        pid = k.proc.pid
        k.wait_ready()
        time.sleep(1.5)
        assert k.stop() == 0
        time.sleep(0.3)
    finally:
        fake.close()
    lines = fake.lines()
    assert lines == fake.lines(pid), "every message comes from the daemon's PID"
    ready = lines.index("READY=1")
    statuses = [x for x in lines[:ready] if x.startswith("STATUS=")]
    assert statuses.index("STATUS=applying config") < statuses.index("STATUS=attaching programs"), statuses
    assert fake.at_ready == {"listeners": 1, "programs": harness.PROGRAMS}, fake.at_ready
    assert lines[-1] == "STOPPING=1" or "STOPPING=1" in lines[ready:]
    pings = [t for t, _, text in fake.messages if text == "WATCHDOG=1"]
    assert len(pings) >= 4, pings                      # every ~0.2 s for 1.5 s
    assert max(b - a for a, b in zip(pings, pings[1:])) < 0.4
    assert "WATCHDOG=1" not in lines[:ready]           # only once serving
