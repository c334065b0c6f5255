"""Naming a workload (kmesh.dataplane.workloads): pure logic over files a
test makes; the kernel side is in tests/e2e/test_pods.py."""
from __future__ import annotations

import os
import stat

import pytest

from kmesh.dataplane import workloads as wl

ROOT = "/sys/fs/cgroup/unified"


def test_cgroup2_root_is_read_from_mountinfo(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text("24 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n"
                  "29 28 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate\n")
    assert wl.cgroup2_root(str(mi)) == "/sys/fs/cgroup/unified"
    mi.write_text("24 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n")
    with pytest.raises(ValueError, match="no cgroup2 file system"):
        wl.cgroup2_root(str(mi))


def test_cgroup_of_a_pid_is_its_unified_line(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text("12:cpu,cpuacct:/x\n0::/kubepods.slice/pod1.slice/cri-a.scope\n")
    assert wl.cgroup_path_of_pid(42, ROOT, proc=str(tmp_path)) == f"{ROOT}/kubepods.slice/pod1.slice/cri-a.scope"
    (tmp_path / "43").mkdir()
    (tmp_path / "43" / "cgroup").write_text("0::/\n")
    assert wl.cgroup_path_of_pid(43, ROOT, proc=str(tmp_path)) == ROOT
    with pytest.raises(ValueError, match="no such process"):
        wl.cgroup_path_of_pid(44, ROOT, proc=str(tmp_path))


def _fake_systemctl(tmp_path, monkeypatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "systemctl"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_unit_is_named_by_its_control_group(tmp_path, monkeypatch):
    _fake_systemctl(tmp_path, monkeypatch, 'test "$4" = "--" && test "$5" = nginx.service && '
                    'echo /system.slice/nginx.service\n')
    assert wl.name({"unit": "nginx.service"}, ROOT) == (wl.Kind.CGROUP, f"{ROOT}/system.slice/nginx.service")


def test_a_unit_without_a_cgroup_is_refused(tmp_path, monkeypatch):
    _fake_systemctl(tmp_path, monkeypatch, "echo\n")
    with pytest.raises(ValueError, match="unit gone.service: systemd knows no cgroup for it"):
        wl.name({"unit": "gone.service"}, ROOT)


def test_exactly_one_selector():
    with pytest.raises(ValueError, match="exactly one of"):
        wl.name({}, ROOT)
    with pytest.raises(ValueError, match=r"\(got cgroup, netns\)"):
        wl.name({"cgroup": "/a", "netns": "/run/netns/x"}, ROOT)
    with pytest.raises(ValueError, match=r"\(got color\)"):
        wl.name({"color": "red"}, ROOT)
    with pytest.raises(ValueError, match="not a process id"):
        wl.name({"pid": "12x"}, ROOT)


def test_cgroup_paths_absolute_or_under_the_mount():
    assert wl.name({"cgroup": f"{ROOT}/a/b"}, ROOT) == (wl.Kind.CGROUP, f"{ROOT}/a/b")
    assert wl.name({"cgroup": "/a/b"}, ROOT) == (wl.Kind.CGROUP, f"{ROOT}/a/b")
    assert wl.name({"cgroup": "a/../b"}, ROOT) == (wl.Kind.CGROUP, f"{ROOT}/b")
    assert wl.name({"netns": "/run/netns/p"}, ROOT) == (wl.Kind.NETNS, "/run/netns/p")


def test_a_pid_in_the_daemons_namespace_names_its_cgroup():
    kind, path = wl.name({"pid": str(os.getpid())})
    assert kind == wl.Kind.CGROUP and os.path.exists(os.path.join(path, "cgroup.procs"))


def test_identify_checks_what_the_path_is(tmp_path):
    with pytest.raises(ValueError, match="not a cgroup2 directory"):
        wl.identify(wl.Kind.CGROUP, str(tmp_path))
    with pytest.raises(ValueError, match="not a network namespace"):
        wl.identify(wl.Kind.NETNS, "/proc/self/ns/mnt")
    with pytest.raises(ValueError, match="No such file"):
        wl.identify(wl.Kind.NETNS, str(tmp_path / "gone"))
    assert wl.identify(wl.Kind.NETNS, "/proc/self/ns/net") == os.stat("/proc/self/ns/net").st_ino


def test_paths_the_map_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="longer than 127 bytes"):
        wl.check_path("/x" * 64)
    wl.check_path("/x" * 63)
