"""The RPM and kmesh.service under a real systemd (252, in a Debian minbase
container booted with systemd-nspawn; see tests/support/nspawn.py).

One container for the module; the tests run in order and each leaves the
state the next one starts from: install and start, restart and upgrade under
load, the watchdog, stop, erase. VIPs and backends are on the container's
own loopback; kmesh governs the container's ``kmesh-clients`` cgroup only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.support import harness, nspawn
from tests.support.envoy import bootstrap, cluster, hcm_listener, lb_ep, tcp_listener

VIP, PORT = "127.100.0.10", 80
L7_PORT = 81   # an HTTP route by path: through the L7 hand-off, spliced
BACKENDS = {"A": 18081, "B": 18082}
CLIENTS = "/sys/fs/cgroup/unified/kmesh-clients"
BPFFS = "/run/kmesh-bpffs"
PROGRAMS = harness.PROGRAMS
SYSCONFIG = f"""\
KMESH_OPTS="-enable-kmesh -enable-ads=false -config-file /etc/kmesh/kmesh.yaml -admin-address 127.0.0.1:15200"
KMESH_BPF_FS_PATH={BPFFS}
KMESH_CGROUP2_PATH={CLIENTS}
"""
# A bpffs outside /sys/fs/bpf must be writable in the unit's sandbox (kmesh.sysconfig says so).
DROP_IN = "/etc/systemd/system/kmesh.service.d/bpffs.conf"
# The unit's CapabilityBoundingSet=; the container's own bounding set lacks some of them.
CAPS = {"cap_bpf", "cap_perfmon", "cap_net_admin", "cap_sys_admin", "cap_sys_ptrace", "cap_chown"}
CAP_BITS = {"cap_chown": 0, "cap_net_admin": 12, "cap_sys_ptrace": 19, "cap_sys_admin": 21, "cap_perfmon": 38,
            "cap_bpf": 39}


def build_rpm(release: int) -> Path:
    res = subprocess.run([str(ROOT / "build.sh"), "rpm", str(release)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return Path(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rpms(bpf_object) -> dict[int, Path]:
    return {release: build_rpm(release) for release in (1, 2)}


def test_rpmlint_is_clean_with_the_documented_filters(rpms):
    res = subprocess.run(["rpmlint", "-r", str(ROOT / "packaging" / "rpm" / "kmesh.rpmlintrc"), str(rpms[1])],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "0 errors, 0 warnings" in res.stdout, res.stdout + res.stderr


# Directories the RPM does not own (the filesystem package does).
SHARED_DIRS = {"/etc", "/etc/sysconfig", "/usr", "/usr/bin", "/usr/lib", "/usr/share", "/usr/share/doc",
               "/usr/share/licenses", "/usr/lib/systemd", "/usr/lib/systemd/system"}


def _tree(root: Path) -> set[str]:
    return {"/" + str(p.relative_to(root)) for p in root.rglob("*")}


def test_build_sh_installs_and_uninstalls_what_the_rpm_does(rpms, tmp_path):
    """Same paths, except inside the private venv's site-packages (the RPM
    takes the runtime packages from the distribution, build.sh from PyPI) and
    what pip and venv leave in venv/bin."""
    listed = subprocess.run(["rpm", "-qlp", str(rpms[1])], capture_output=True, text=True, check=True).stdout.split()
    dest = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(dest)}
    res = subprocess.run([str(ROOT / "build.sh"), "-i"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]

    venv = "/usr/lib/kmesh/venv"
    entry_points = {f"{venv}/bin/kmesh-daemon", f"{venv}/bin/kmesh-cmd"}

    def comparable(paths):
        """Outside the venv; in it, two levels (venv/lib/python3.X) but not
        bin/, where only the entry points are compared."""
        return {p for p in paths if not p.startswith(venv + "/") or p in entry_points
                or (p.count("/") - venv.count("/") <= 2 and not p.startswith(venv + "/bin/"))}

    installed = _tree(dest)
    assert comparable(installed) - SHARED_DIRS == comparable(listed)
    # the venv runs from /usr, not from where it was installed
    assert str(dest) not in (dest / "usr/lib/kmesh/venv/bin/kmesh-daemon").read_text()
    assert str(dest) not in (dest / "usr/lib/kmesh/venv/pyvenv.cfg").read_text()
    res = subprocess.run([str(ROOT / "build.sh"), "-u"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p for p in _tree(dest) if not p.startswith("/etc")} <= SHARED_DIRS


@pytest.fixture(scope="module")
def box(tmp_path_factory, rpms):
    share = tmp_path_factory.mktemp("share")
    for release, path in rpms.items():
        shutil.copy(path, share / f"kmesh-{release}.rpm")
    shutil.copy(ROOT / "examples" / "backend.py", share)
    shutil.copy(ROOT / "tests" / "support" / "client.py", share)
    c = nspawn.Container(share)
    try:
        c.start()
        c.run("mkdir", "-p", CLIENTS)
        for name, port in BACKENDS.items():
            c.run("systemd-run", f"--unit=kmesh-test-backend-{name}", "python3", "/mnt/kmesh-test/backend.py",
                  name, str(port))
        yield c
    finally:
        c.close()


def in_clients(c: nspawn.Container, *cmd: str) -> list[str]:
    """argv of ``cmd`` run inside the governed cgroup."""
    return ["sh", "-c", f'echo $$ > {CLIENTS}/cgroup.procs && exec "$@"', "sh", *cmd]


def curl(c: nspawn.Container) -> subprocess.CompletedProcess:
    return c.run(*in_clients(c, "curl", "-sS", "--max-time", "5", f"http://{VIP}:{PORT}/"), check=False)


def attached(c: nspawn.Container) -> list[str]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(c.host_cgroup / "kmesh-clients")],
                         capture_output=True, text=True).stdout.strip()
    return sorted(p.get("name", "") for p in json.loads(out or "[]"))


def wait_active(c: nspawn.Container, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if c.show("kmesh.service", "ActiveState") == "active" and c.show("kmesh.service", "SubState") == "running":
            return
        time.sleep(0.2)
    raise AssertionError(c.run("journalctl", "-u", "kmesh", "--no-pager", "-n", "50", check=False).stdout)


class Load:
    """The test client looping on the VIP inside the governed cgroup."""

    def __init__(self, c: nspawn.Container, seconds: int = 300):
        self.c = c
        self.proc = c.popen(*in_clients(c, "python3", "/mnt/kmesh-test/client.py", "loop", VIP, str(PORT),
                                        str(seconds)), stdout=subprocess.PIPE, text=True)

    def report(self) -> dict:
        # nsenter does not pass signals on to what it runs in the container's PID namespace
        self.c.run("pkill", "-TERM", "-f", "client.py loop", check=False)
        return json.loads(self.proc.communicate(timeout=30)[0])


def test_install_and_start(box):
    c = box
    c.run("rpm", "-i", "--nodeps", "/mnt/kmesh-test/kmesh-1.rpm")
    assert c.run("rpm", "-q", "kmesh").stdout.strip() == "kmesh-0.1.0-1.x86_64"
    assert c.show("kmesh.service", "UnitFileState") == "enabled"   # %post presets it
    c.write("/etc/kmesh/kmesh.yaml", yaml.safe_dump(bootstrap(
        [tcp_listener("web", VIP, PORT, "web"),
         hcm_listener("web-l7", VIP, L7_PORT, [{"match": {"prefix": "/a"}, "route": {"cluster": "web-a"}}])],
        [cluster("web", *(lb_ep("127.0.0.1", p) for p in BACKENDS.values())),
         cluster("web-a", lb_ep("127.0.0.1", BACKENDS["A"]))])))
    c.write("/etc/sysconfig/kmesh", SYSCONFIG)
    c.write(DROP_IN, f"[Service]\nReadWritePaths=-{BPFFS}\n")
    c.run("systemctl", "daemon-reload")
    r = c.run("systemctl", "start", "kmesh.service", check=False)
    assert r.returncode == 0, c.run("journalctl", "-u", "kmesh", "--no-pager", "-n", "50", check=False).stdout
    wait_active(c)
    assert c.show("kmesh.service", "StatusText") == "ready"
    assert c.run("mountpoint", "-q", BPFFS, check=False).returncode == 0     # start-pre mounted it
    assert attached(c) == PROGRAMS
    got = {curl(c).stdout.strip() for _ in range(6)}
    assert got == {"A", "B"}
    # outside the governed cgroup nothing changes: nothing listens on the VIP
    assert c.run("curl", "-sS", "--max-time", "5", f"http://{VIP}:{PORT}/", check=False).returncode == 7


def in_daemon(c: nspawn.Container, *cmd: str) -> subprocess.CompletedProcess:
    """``cmd`` in the daemon's own mount namespace."""
    pid = c.show("kmesh.service", "MainPID")
    return c.run("nsenter", "-t", pid, "-m", "--", *cmd, check=False)


def test_the_sandbox_is_in_force(box):
    c = box
    got = {k: c.show("kmesh.service", k) for k in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                                                   "CapabilityBoundingSet", "RestrictAddressFamilies")}
    assert (got["NoNewPrivileges"], got["ProtectSystem"], got["ProtectHome"], got["PrivateTmp"]) == \
        ("yes", "strict", "yes", "yes"), got
    assert set(got["CapabilityBoundingSet"].split()) == CAPS
    assert set(got["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    pid = c.show("kmesh.service", "MainPID")
    status = dict(line.split(":", 1) for line in c.run("cat", f"/proc/{pid}/status").stdout.splitlines())
    container = int(c.run("awk", "/^CapBnd/ {print $2}", "/proc/1/status").stdout, 16)
    assert int(status["CapBnd"], 16) == sum(1 << CAP_BITS[cap] for cap in CAPS) & container
    assert int(status["CapEff"], 16) == int(status["CapBnd"], 16)
    assert (status["NoNewPrivs"].strip(), status["Seccomp"].strip()) == ("1", "2")
    # The daemon has a mount namespace of its own...
    assert c.run("readlink", f"/proc/{pid}/ns/mnt").stdout != c.run("readlink", "/proc/1/ns/mnt").stdout
    # ... but start-pre mounted the bpffs in PID 1's, and the pins are there for everybody.
    assert c.run("mountpoint", "-q", BPFFS, check=False).returncode == 0
    assert set(PROGRAMS) <= set(c.run("ls", f"{BPFFS}/bpf_kmesh/link").stdout.split())
    assert c.run("cat", "/run/kmesh/mounts-made").stdout.split() == [BPFFS]
    # What it may write, and what not.
    assert in_daemon(c, "test", "-w", f"{BPFFS}/bpf_kmesh/link").returncode == 0
    assert in_daemon(c, "test", "-w", "/run/kmesh").returncode == 0
    for path in ("/etc/kmesh/kmesh.yaml", "/run/kmesh-test", "/usr/lib/kmesh/x", "/var/lib/x"):
        r = in_daemon(c, "touch", path)
        assert r.returncode != 0 and "Read-only file system" in r.stderr, (path, r.stderr)
    assert in_daemon(c, "stat", "-c", "%a", "/home").stdout.strip() == "0"    # ProtectHome=yes: inaccessible


def test_sockmap_on_an_rpm_install(box):
    """-enable-sockmap at runtime: pyroute2 (a Requires:) reads the host's
    addresses over netlink from inside the sandbox."""
    c = box

    def post(path: str) -> dict:
        return json.loads(c.run("curl", "-sS", "--fail-with-body", "-X", "POST", f"http://127.0.0.1:15200{path}").stdout)

    assert post("/sockmap/on")["state"] == "on"
    assert "kmesh_sockops" in attached(c)
    assert post("/sockmap/off")["state"] == "off"
    assert attached(c) == PROGRAMS
    journal = c.run("journalctl", "-u", "kmesh", "--no-pager", "-o", "cat").stdout
    assert "same-host acceleration on" in journal and "level=error" not in journal, journal[-3000:]


def test_enroll_a_unit_by_name(box):
    """kmeshctl enroll --unit: the daemon asks systemd for the unit's cgroup."""
    c = box
    unit = "kmesh-test-backend-A.service"
    got = json.loads(c.run("kmeshctl", "-o", "json", "enroll", "--unit", unit).stdout)
    w = got["workload"]
    assert (w["kind"], w["mode"]) == ("cgroup", "enrolled") and w["path"].endswith(f"/system.slice/{unit}"), got
    assert c.run("test", "-e", f"{w['path']}/cgroup.procs", check=False).returncode == 0
    assert [x["path"] for x in got["workloads"] if x["kind"] == "cgroup" and not x.get("scope")] == [w["path"]]
    got = json.loads(c.run("kmeshctl", "-o", "json", "unenroll", "--unit", unit).stdout)
    assert got["changed"] and [x for x in got["workloads"] if not x.get("scope")] == []
    r = c.run("kmeshctl", "enroll", "--unit", "no-such.service", check=False)
    assert r.returncode == 2 and "systemd knows no cgroup for it" in r.stderr, r.stdout + r.stderr


def test_enroll_across_the_sandbox(box):
    """/run/netns stays readable and gets namespaces made after the daemon
    started; /proc/PID/ns/net of another user's process needs CAP_SYS_PTRACE."""
    c = box
    name = f"kmesh-test-{uuid.uuid4().hex[:8]}"
    c.run("ip", "netns", "add", name)
    c.run("systemd-run", f"--unit={name}", "-p", "User=nobody", "-p", "PrivateNetwork=yes", "sleep", "300")
    try:
        got = json.loads(c.run("kmeshctl", "-o", "json", "enroll", "--netns", f"/run/netns/{name}").stdout)
        assert got["workload"]["kind"] == "netns", got
        pid = c.show(f"{name}.service", "MainPID")
        assert c.run("stat", "-c", "%U", f"/proc/{pid}").stdout.strip() == "nobody"
        got = json.loads(c.run("kmeshctl", "-o", "json", "enroll", "--pid", pid).stdout)
        assert got["workload"]["path"] == f"/proc/{pid}/ns/net", got
        c.run("kmeshctl", "unenroll", "--pid", pid)
        c.run("kmeshctl", "unenroll", "--netns", f"/run/netns/{name}")
    finally:
        c.run("systemctl", "stop", f"{name}.service", check=False)
        c.run("ip", "netns", "del", name, check=False)
    assert [w for w in json.loads(c.run("kmeshctl", "-o", "json", "list").stdout)["workloads"]
            if not w.get("scope")] == []


def test_restart_and_upgrade_under_load(box):
    c = box
    load = Load(c)
    try:
        time.sleep(1)
        pid = c.show("kmesh.service", "MainPID")
        c.run("systemctl", "restart", "kmesh.service")
        wait_active(c)
        assert c.show("kmesh.service", "MainPID") != pid
        time.sleep(1)
        c.run("rpm", "-U", "--nodeps", "/mnt/kmesh-test/kmesh-2.rpm")   # %postun: try-restart
        wait_active(c)
        time.sleep(1)
    finally:
        report = load.report()
    assert c.run("rpm", "-q", "kmesh").stdout.strip() == "kmesh-0.1.0-2.x86_64"
    assert report["failed"] == 0 and report["ok"] > 50, report
    assert set(report["bodies"]) == {"A", "B"}
    journal = c.run("journalctl", "-u", "kmesh", "--no-pager", "-o", "cat").stdout
    assert journal.count("takeover=True") >= 2, journal[-3000:]
    assert "restarting (job=restart" in journal
    assert attached(c) == PROGRAMS          # replaced in place: no duplicates


def test_restart_keeps_keep_alive_l7_connections(box):
    """The stopping daemon puts a keep-alive L7 connection (between two
    requests) in systemd's fd store (FileDescriptorStoreMax); the next one
    gets it back and serves its next request. (Spliced connections take
    the same way: tests/e2e/test_l7_splice.py.)"""
    c = box
    client = c.popen(*in_clients(c, "python3", "/mnt/kmesh-test/client.py", "keepalive", VIP, str(L7_PORT), "/a"),
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(line: str = "get") -> str:
        client.stdin.write(line + "\n")
        client.stdin.flush()
        return client.stdout.readline().strip()

    try:
        assert ask() == "A"
        pid = c.show("kmesh.service", "MainPID")
        c.run("systemctl", "restart", "kmesh.service")
        wait_active(c)
        assert c.show("kmesh.service", "MainPID") != pid
        assert ask() == "A"              # the same connection, now the new daemon's
        journal = c.run("journalctl", "-u", "kmesh", "--no-pager", "-o", "cat").stdout
        assert 'msg="idle keep-alive L7 connections taken over" connections=1' in journal, journal[-3000:]
        assert ask() == "A"
        assert ask("close") == "eof"
    finally:
        client.kill()
        client.wait()


def test_watchdog_restarts_a_frozen_daemon(box):
    c = box
    c.write("/etc/systemd/system/kmesh.service.d/test-watchdog.conf",
            "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=2s\nRestartSec=1s\n")
    c.run("systemctl", "daemon-reload")
    c.run("systemctl", "restart", "kmesh.service")
    wait_active(c)
    restarts = int(c.show("kmesh.service", "NRestarts"))
    pid = c.show("kmesh.service", "MainPID")
    load = Load(c)
    try:
        time.sleep(1)
        c.run("kill", "-STOP", pid)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if int(c.show("kmesh.service", "NRestarts")) > restarts and \
                    c.show("kmesh.service", "MainPID") not in ("0", pid):
                break
            time.sleep(0.3)
        wait_active(c)
        time.sleep(1)
    finally:
        report = load.report()
        c.run("rm", "-f", "/etc/systemd/system/kmesh.service.d/test-watchdog.conf")
        c.run("systemctl", "daemon-reload")
    assert c.show("kmesh.service", "MainPID") != pid
    journal = c.run("journalctl", "-u", "kmesh", "--no-pager", "-o", "cat").stdout
    assert "Watchdog timeout" in journal or "watchdog" in journal.lower(), journal[-3000:]
    # frozen, killed and restarted: the pinned programs served throughout
    assert report["failed"] == 0 and report["ok"] > 20, report
    assert attached(c) == PROGRAMS


def test_stop_means_off(box):
    c = box
    c.run("systemctl", "stop", "kmesh.service")
    assert c.show("kmesh.service", "ActiveState") == "inactive"
    assert attached(c) == []
    assert c.run("test", "-e", f"{BPFFS}/bpf_kmesh", check=False).returncode != 0
    assert curl(c).returncode == 7          # not redirected any more: nothing listens on the VIP
    c.run("systemctl", "start", "kmesh.service")
    wait_active(c)
    assert curl(c).stdout.strip() in BACKENDS


def test_erase_leaves_nothing(box):
    c = box
    c.run("rpm", "-e", "--nodeps", "kmesh")
    assert c.run("rpm", "-q", "kmesh", check=False).returncode != 0
    assert attached(c) == []
    assert c.run("mountpoint", "-q", BPFFS, check=False).returncode != 0   # kmesh mounted it: gone
    assert c.run("test", "-e", "/usr/lib/kmesh", check=False).returncode != 0
    assert c.run("systemctl", "cat", "kmesh.service", check=False).returncode != 0
    assert curl(c).returncode == 7
