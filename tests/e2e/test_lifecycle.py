"""Daemon lifecycle on the real kernel: reloads, admin API, stop, crash, restart."""
from __future__ import annotations

import signal
import subprocess

import yaml

from kmesh.bpf import loader, records
from tests.support import harness
from tests.support.envoy import bootstrap, cluster, lb_ep, tcp_listener
from tests.e2e.test_l4 import vip


def two_vips(v1, v2, a, b, c1_eps=None):
    return bootstrap([tcp_listener("one", v1, 80, "c1"), tcp_listener("two", v2, 80, "c2")],
                     [cluster("c1", *(c1_eps or [lb_ep(*a.addr)])), cluster("c2", lb_ep(*b.addr))])


def test_sighup_reload_add_update_delete(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    v1, v2 = vip(), vip()
    k = kmesh(bootstrap([tcp_listener("one", v1, 80, "c1")], [cluster("c1", lb_ep(*a.addr))]))
    assert cgroup.curl(f"http://{v1}/") == ["A"]
    # add a listener and a cluster
    k.write_config(two_vips(v1, v2, a, b))
    res = k.reload()
    assert res["result"] == "applied", res
    assert cgroup.curl(f"http://{v2}/") == ["B"]
    # update: c1 now points at B
    k.write_config(two_vips(v1, v2, a, b, c1_eps=[lb_ep(*b.addr)]))
    assert k.reload()["changes"]["clusters_written"] == 1
    assert cgroup.curl(f"http://{v1}/") == ["B"]
    # delete the second listener and its cluster
    k.write_config(bootstrap([tcp_listener("one", v1, 80, "c1")], [cluster("c1", lb_ep(*b.addr))]))
    res = k.reload()
    assert res["changes"] == {"clusters_written": 0, "listeners_written": 0,
                              "listeners_deleted": 1, "clusters_deleted": 1}
    r = cgroup.run(["curl", "-sS", "--max-time", "5", f"http://{v2}/"])
    assert r.returncode == 7  # unmapped again
    maps = k.get("/bpf/kmesh/maps")
    assert list(maps["km_listener"]) == [f"{v1}:80"] and len(maps["km_cluster"]) == 1


def test_bad_reload_keeps_old_config(kmesh, cgroup, backends):
    (a,) = backends("A")
    v = vip()
    good = bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr))])
    k = kmesh(good)
    bad = bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr), lb="MAGLEV")])
    k.write_config(bad)
    res = k.reload()
    assert res["result"] == "rejected"
    assert res["errors"] == [f"{k.config_path}: static_resources.clusters[0].lb_policy: MAGLEV is not supported; "
                             "use ROUND_ROBIN, RANDOM or LEAST_REQUEST"]
    assert cgroup.curl(f"http://{v}/") == ["A"]
    status = k.get("/status")
    assert status["config_version"] == 1 and status["last_update"]["result"] == "rejected"
    assert k.get("/controller/envoy")["static_resources"]["clusters"][0]["name"] == "c1"
    assert "config rejected" in k.log()
    # An unparsable file is refused the same way.
    k.write_config("static_resources: [\n")
    assert k.reload()["result"] == "rejected"
    assert cgroup.curl(f"http://{v}/") == ["A"]


def test_admin_api_and_kmesh_cmd(kmesh, cgroup, backends, tmp_path):
    a, b = backends("A", "B")
    v = vip()
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr))]))
    assert k.get("/ready", raw=True) == (200, b"ready\n")
    assert k.get("/options")["enable_ads"] is False
    assert b"/bpf/kmesh/maps" in k.get("/help", raw=True)[1]
    # POST replaces the static config
    status, res = k.post_config(bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*b.addr))]))
    assert status == 200 and res["result"] == "applied"
    assert cgroup.curl(f"http://{v}/") == ["B"]
    # kmesh-cmd: accepted and refused files
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr))])))
    cmd = [str(harness.BIN / "kmesh-cmd"), "-config-file", str(good), f"-admin-address=127.0.0.1:{k.admin_port}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert cgroup.curl(f"http://{v}/") == ["A"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(bootstrap([tcp_listener("one", v, 80, "nope")], [cluster("c1", lb_ep(*a.addr))])))
    cmd[2] = str(bad)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{bad}: static_resources.listeners[0].filter_chains[0].filters[0].typed_config.cluster: " \
           "cluster 'nope' is not defined" in r.stderr
    assert cgroup.curl(f"http://{v}/") == ["A"]
    assert k.get("/controller/envoy")["static_resources"]["listeners"][0]["name"] == "one"


def test_200_reloads_under_load_never_fail_a_connect(kmesh, cgroup, backends):
    a, b, c = backends("A", "B", "C")
    v = vip()
    configs = [
        bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr), lb_ep(*b.addr))]),
        # endpoints change in place
        bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*b.addr), lb_ep(*c.addr))]),
        # switch to differently named clusters: add-before-delete ordering
        bootstrap([tcp_listener("one", v, 80, [("c2", 1), ("c3", 1)])],
                  [cluster("c2", lb_ep(*c.addr)), cluster("c3", lb_ep(*a.addr), lb="RANDOM")]),
        bootstrap([tcp_listener("one", v, 80, "c4")], [cluster("c4", lb_ep(*a.addr, 5), lb="LEAST_REQUEST")]),
    ]
    k = kmesh(configs[0])
    load = cgroup.load(v, 80, 300)
    try:
        for i in range(200):
            status, res = k.post_config(configs[(i + 1) % len(configs)])
            assert status == 200, res
    finally:
        report = load.report()
    assert report["failed"] == 0, report
    assert report["ok"] > 200, report
    print(f"200 reloads: {report['ok']} connections, {report['failed']} failed")
    assert set(report["bodies"]) == {"A", "B", "C"}
    assert k.get("/status")["config_version"] == 201


def test_sigterm_fails_static_and_cleanup_removes_everything(kmesh, cgroup, backends):
    (a,) = backends("A")
    v = vip()
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr))]))
    assert sorted(k.attached_programs()) == harness.PROGRAMS
    assert k.stop(signal.SIGTERM) == 0
    assert "kmesh-daemon stopped" in k.log()
    # Fail static: no daemon, the last config still in force.
    assert sorted(k.attached_programs()) == harness.PROGRAMS
    assert cgroup.curl(f"http://{v}/") == ["A"]
    r = subprocess.run([str(harness.BIN / "kmesh-daemon"), f"-bpf-fs-path={k.bpf_fs_path}", "cleanup"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert k.attached_programs() == []
    assert not k.pin_root.exists()
    assert cgroup.run(["curl", "-sS", "--max-time", "5", f"http://{v}/"]).returncode == 7


def test_sigkill_then_restart_keeps_traffic(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    v = vip()
    cfg = bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr), lb_ep(*b.addr))])
    k = kmesh(cfg)
    load = cgroup.load(v, 80, 6)
    k.stop(signal.SIGKILL)
    assert sorted(k.attached_programs()) == harness.PROGRAMS  # pinned links hold
    # Served while no daemon runs (the load client shares the RR cursor, so
    # which backend each of these gets is not fixed).
    assert set(cgroup.curl(f"http://{v}/[1-4]")) <= {"A", "B"}
    k.start()   # same pins: takes over
    assert "takeover=True" in k.log() and "kmesh_connect4:replaced" in k.log()
    assert k.get("/status")["last_update"]["changes"] == {
        "clusters_written": 0, "listeners_written": 0, "listeners_deleted": 0, "clusters_deleted": 0}
    report = load.report(stop=False)
    assert report["failed"] == 0 and set(report["bodies"]) == {"A", "B"}, report
    assert sorted(k.attached_programs()) == harness.PROGRAMS  # no duplicates


def test_restart_with_changed_config_switches_without_gap(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    v = vip()
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr))]))
    k.stop(signal.SIGKILL)
    k.write_config(bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*b.addr))]))
    load = cgroup.load(v, 80, 4)
    k.start()
    report = load.report(stop=False)
    assert report["failed"] == 0, report
    assert cgroup.curl(f"http://{v}/") == ["B"]
    assert len(k.get("/bpf/kmesh/maps")["km_cluster"]) == 1  # the old record is gone


def test_bad_config_at_start_fails_cleanly(kmesh, cgroup):
    k = kmesh(bootstrap([tcp_listener("one", vip(), 80, "missing")], []), wait=False)
    assert k.proc.wait(30) == 2
    assert "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.cluster: " \
           "cluster 'missing' is not defined" in k.log()
    assert not k.pin_root.exists() and k.attached_programs() == []


def test_second_daemon_on_same_pins_is_refused(kmesh, cgroup, backends):
    (a,) = backends("A")
    v = vip()
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr))]))
    second = harness.Kmesh(cgroup, k.config_path, bpf_fs_path=k.bpf_fs_path)
    r = subprocess.run(second.argv(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "another kmesh-daemon is using" in r.stderr
    assert not second.admin_socket.exists()   # a failed start closes what it opened
    second.admin_socket.parent.rmdir()
    r = subprocess.run([str(harness.BIN / "kmesh-daemon"), f"-bpf-fs-path={k.bpf_fs_path}", "cleanup"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "running daemon" in r.stderr
    assert cgroup.curl(f"http://{v}/") == ["A"]  # the first one is untouched


def test_upgrade_with_another_record_layout_migrates_without_a_gap(kmesh, cgroup, backends):
    a, b = backends("A", "B")
    v = vip()
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr))]))
    assert k.pinned_layout() == records.KMESH_LAYOUT_VERSION
    k.stop(signal.SIGTERM)
    k.stamp_layout(0)                           # "written by an older kmesh"
    (k.pin_root / "staging").mkdir()              # and an interrupted migration's leftovers
    k.write_config(bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*b.addr))]))
    load = cgroup.load(v, 80, 4)
    k.start()
    report = load.report(stop=False)
    assert report["failed"] == 0, report
    log = k.log()
    assert "migrating" in log and "pinned maps migrated" in log, log
    assert k.pinned_layout() == records.KMESH_LAYOUT_VERSION
    assert not (k.pin_root / "staging").exists()
    assert {p.name for p in (k.pin_root / "map").iterdir()} >= {*loader.MAP_TYPES, "km_sock_ep", "km_events"}
    assert sorted(k.attached_programs()) == harness.PROGRAMS
    assert cgroup.curl(f"http://{v}/[1-3]") == ["B"] * 3
    # and the next restart is an ordinary takeover of the migrated pins
    k.stop(signal.SIGTERM)
    k.start()
    assert "migrating" not in k.log() and "takeover=True" in k.log()
    assert cgroup.curl(f"http://{v}/") == ["B"]


def test_restarts_under_load_never_fail_a_connect(kmesh, cgroup, backends):
    """What `systemctl restart` does to the daemon, five times over, while a
    client loops on the VIP."""
    a, b = backends("A", "B")
    v = vip()
    k = kmesh(bootstrap([tcp_listener("one", v, 80, "c1")], [cluster("c1", lb_ep(*a.addr), lb_ep(*b.addr))]))
    load = cgroup.load(v, 80, 60)
    try:
        for _ in range(5):
            assert k.stop(signal.SIGTERM) == 0
            k.start()
            assert "takeover=True" in k.log()
    finally:
        report = load.report()
    assert report["failed"] == 0 and set(report["bodies"]) == {"A", "B"}, report
    assert sorted(k.attached_programs()) == harness.PROGRAMS
