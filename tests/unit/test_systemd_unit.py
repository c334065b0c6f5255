"""systemd/: kmesh.service, its helper scripts and /etc/sysconfig/kmesh.

Nothing here attaches a BPF program or mounts anything at a new place; the
only mount ever made is bpffs at /sys/fs/bpf when it is missing (it is where
everything in kmesh expects it).
"""
from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "kmesh.service"
START_PRE = SYSTEMD / "kmesh-start-pre.sh"
STOP_POST = SYSTEMD / "kmesh-stop-post.sh"
SYSCONFIG = SYSTEMD / "kmesh.sysconfig"
LAYOUT = ROOT / "packaging" / "install-layout.sh"
IMAGE = ROOT / "packaging" / "image" / "build-image.sh"

# Executables the unit names, as installed by build.sh -i and the RPM.
INSTALLED = {
    "/usr/bin/kmesh-daemon": "kmesh-daemon",
    "/usr/lib/kmesh/scripts/kmesh-start-pre.sh": "kmesh-start-pre.sh",
    "/usr/lib/kmesh/scripts/kmesh-stop-post.sh": "kmesh-stop-post.sh",
}


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values (in order) of a unit file; sections are not kept apart."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def env_file(text: str) -> dict[str, str]:
    """NAME=value lines as systemd's EnvironmentFile= reads them (quotes stripped)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        out[name] = " ".join(shlex.split(value))
    return out


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def mounts_of_type(fstype: str) -> list[str]:
    out = []
    for line in mountinfo().splitlines():
        left, right = line.split(" - ", 1)
        if right.split()[0] == fstype:
            out.append(left.split()[4].replace("\\040", " "))
    return out


# -- the unit ---------------------------------------------------------------

@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with its installed executables replaced by stubs in tmp_path."""
    text = UNIT.read_text()
    for installed, name in INSTALLED.items():
        assert installed in text, f"kmesh.service no longer runs {installed}"
        stub = tmp_path / "bin" / name
        stub.parent.mkdir(exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
        text = text.replace(installed, str(stub))
    copy = tmp_path / "kmesh.service"
    copy.write_text(text)
    return copy


def analyze_verify(unit: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is not installed: ./build.sh setup installs it (Debian package systemd)")
    return run([exe, "verify", str(unit)], cwd=unit.parent)


def test_systemd_analyze_verify_is_silent(unit_copy: Path):
    # systemd-analyze exits 0 on unknown keys and bad values: any output fails.
    res = analyze_verify(unit_copy)
    assert res.stdout == "" and res.stderr == "", res.stdout + res.stderr
    assert res.returncode == 0


def test_systemd_analyze_verify_would_catch_a_mistake(unit_copy: Path):
    # The silence above means something only if a broken unit is not silent.
    unit_copy.write_text(unit_copy.read_text().replace("[Service]\n", "[Service]\nWatchdogSecs=5\n"))
    res = analyze_verify(unit_copy)
    assert "WatchdogSecs" in res.stdout + res.stderr


def test_unit_settings():
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["EnvironmentFile"] == ["-/etc/sysconfig/kmesh"]
    # "+": outside the sandbox; the mounts go to PID 1's mount namespace (the host's)
    assert s["ExecStartPre"] == ["+/usr/bin/nsenter --mount=/proc/1/ns/mnt -- /usr/lib/kmesh/scripts/kmesh-start-pre.sh"]
    assert s["ExecStopPost"] == ["+/usr/lib/kmesh/scripts/kmesh-stop-post.sh %n"]
    (start,) = s["ExecStart"]
    assert start.startswith("/usr/bin/kmesh-daemon ") and start.endswith(" $KMESH_OPTS")
    # The helpers and the daemon must agree on the two paths.
    assert "-bpf-fs-path ${KMESH_BPF_FS_PATH}" in start
    assert "-cgroup2-path ${KMESH_CGROUP2_PATH}" in start
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["KillSignal"] == ["SIGTERM"]
    assert s["Restart"] == ["on-failure"]
    assert s["TimeoutStartSec"]
    assert s["LimitMEMLOCK"] == ["infinity"]
    assert s["StandardOutput"] == ["journal"] and s["StandardError"] == ["journal"]
    assert s["After"] == ["network.target"]
    assert s["WantedBy"] == ["multi-user.target"]
    assert s["WatchdogSec"] == ["30s"] and s["NotifyAccess"] == ["main"]


# What the daemon needs, and nothing else (README "The unit's sandbox").
CAPABILITIES = {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_CHOWN"}
# systemd-analyze security's overall exposure (10 = UNSAFE); 9.6 without the sandbox.
EXPOSURE_MAX = 2.9


def test_unit_sandbox():
    s = unit_settings(UNIT.read_text())
    assert set(" ".join(s["CapabilityBoundingSet"]).split()) == CAPABILITIES
    assert "AmbientCapabilities" not in s          # root: the bounding set is what limits it
    assert "User" not in s
    for key, want in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                      "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
                      "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
                      "ProtectClock": "yes", "ProtectHostname": "yes", "RestrictRealtime": "yes",
                      "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
                      "SystemCallArchitectures": "native", "RestrictNamespaces": "net",
                      "RuntimeDirectory": "kmesh", "RuntimeDirectoryPreserve": "yes", "UMask": "0077"}.items():
        assert s.get(key) == [want], key
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert s["SystemCallFilter"][0].split() == ["@system-service", "bpf"]     # no @mount: see below
    # Writable: the default bpffs, /run/kmesh (RuntimeDirectory=); not the rest of /run
    # (ProtectKernelTunables= implies MountAPIVFS=, which leaves /run writable otherwise).
    assert s["ReadOnlyPaths"] == ["/run"]
    assert s["ReadWritePaths"] == ["-/sys/fs/bpf"]
    assert s["LogsDirectory"] == ["kmesh"]


def test_the_sandbox_covers_the_default_paths():
    """What the daemon writes by default is writable in the unit; the rest
    (a bpffs elsewhere, -access-log-file outside /var/log/kmesh) needs a
    drop-in, as the sysconfig file says."""
    from kmesh import mounts, options

    s = unit_settings(UNIT.read_text())
    assert os.path.dirname(options.DEFAULT_ADMIN_SOCKET) == "/run/kmesh"
    assert os.path.dirname(mounts.record_path()) == "/run/" + s["RuntimeDirectory"][0]
    assert "-" + options.DEFAULT_BPF_FS_PATH in s["ReadWritePaths"]
    assert "ReadWritePaths=" in SYSCONFIG.read_text()
    # The mounts must be made on the host: the sandboxed daemon may not mount.
    mount_calls = {"mount", "umount2", "fsmount", "move_mount"}
    res = run(["systemd-analyze", "syscall-filter", "@system-service"])
    assert res.returncode == 0
    assert not mount_calls & set(res.stdout.split())


def exposure(unit: Path) -> float:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is not installed: ./build.sh setup installs it (Debian package systemd)")
    res = run([exe, "security", "--offline=yes", "--no-pager", str(unit)], cwd=unit.parent)
    last = res.stdout.strip().splitlines()[-1]
    assert "Overall exposure level for kmesh.service:" in last, res.stdout[-2000:] + res.stderr
    return float(last.split(":")[1].split()[0])


def test_systemd_analyze_security_exposure(unit_copy: Path):
    assert exposure(unit_copy) <= EXPOSURE_MAX


def test_systemd_analyze_security_would_see_the_sandbox_go(unit_copy: Path):
    # The score above means something only if it moves.
    text = unit_copy.read_text()
    start = text.index("# The sandbox")
    unit_copy.write_text(text[:start] + text[text.index("StandardOutput="):])
    assert exposure(unit_copy) > 9


def test_unit_defaults_match_sysconfig():
    """Without /etc/sysconfig/kmesh the unit behaves as with the shipped one."""
    unit_env = {}
    for value in unit_settings(UNIT.read_text())["Environment"]:
        name, _, v = " ".join(shlex.split(value)).partition("=")
        unit_env[name] = v
    sysconfig = env_file(SYSCONFIG.read_text())
    assert sysconfig["KMESH_OPTS"] == unit_env["KMESH_OPTS"] == \
        "-enable-kmesh -enable-ads=false -config-file /etc/kmesh/kmesh.yaml"
    assert unit_env["KMESH_BPF_FS_PATH"] == "/sys/fs/bpf"
    assert unit_env["KMESH_CGROUP2_PATH"] == "/mnt/kmesh_cgroup2"
    # The commented-out defaults in the sysconfig file say the same.
    text = SYSCONFIG.read_text()
    assert "#KMESH_BPF_FS_PATH=/sys/fs/bpf\n" in text
    assert "#KMESH_CGROUP2_PATH=/mnt/kmesh_cgroup2\n" in text


def test_sysconfig_is_shell_compatible():
    # %preun in the RPM sources it with /bin/sh.
    res = run(["sh", "-c", '. "$1" && printf %s "$KMESH_OPTS"', "sh", str(SYSCONFIG)])
    assert res.returncode == 0, res.stderr
    assert res.stdout == env_file(SYSCONFIG.read_text())["KMESH_OPTS"]


# -- the helper scripts -----------------------------------------------------

@pytest.mark.parametrize("script", [START_PRE, STOP_POST, LAYOUT, IMAGE], ids=lambda p: p.name)
def test_script_syntax(script: Path):
    assert script.read_text().startswith("#!/bin/sh\n")
    res = run(["sh", "-n", str(script)])
    assert res.returncode == 0 and res.stderr == "", res.stderr


@pytest.mark.parametrize("script", [START_PRE, STOP_POST, LAYOUT, IMAGE], ids=lambda p: p.name)
def test_script_shellcheck(script: Path):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.fail("shellcheck is not installed: ./build.sh setup installs it")
    res = run([exe, "-s", "sh", str(script)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_scripts_are_executable_in_the_tree():
    for script in (START_PRE, STOP_POST):
        assert script.stat().st_mode & stat.S_IXUSR, f"chmod +x {script}"


def script_fs_type(path: str) -> str:
    """kmesh-start-pre.sh's fs_type function, run on its own."""
    body = START_PRE.read_text()
    start = body.index("fs_type() {")
    end = body.index("\n}\n", start) + 3
    res = run(["sh", "-c", body[start:end] + 'fs_type "$1"', "sh", path])
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_start_pre_fs_type_agrees_with_the_daemon(tmp_path: Path):
    from kmesh import mounts

    paths = ["/", "/proc", "/sys", "/dev", "/run", str(tmp_path)]
    paths += mounts_of_type("bpf")[:1] + mounts_of_type("cgroup2")[:1] + mounts_of_type("cgroup")[:1]
    for p in paths:
        if os.path.isdir(p):
            assert script_fs_type(p) == mounts.fs_type(p), p


@pytest.fixture
def bpffs() -> str:
    if mounts_of_type("bpf"):
        return mounts_of_type("bpf")[0]
    if os.geteuid() != 0:
        pytest.fail("bpffs is not mounted and mounting it needs root")
    os.makedirs("/sys/fs/bpf", exist_ok=True)
    res = run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"])
    assert res.returncode == 0, res.stderr
    return "/sys/fs/bpf"


@pytest.fixture
def cgroup2() -> str:
    found = mounts_of_type("cgroup2")
    if not found:
        pytest.fail("no cgroup2 mount on this host")
    return found[0]


def test_start_pre_mounts_nothing_when_both_are_there(tmp_path: Path, bpffs: str, cgroup2: str):
    run_dir = tmp_path / "run"
    before = mountinfo()
    env = dict(os.environ, KMESH_BPF_FS_PATH=bpffs, KMESH_CGROUP2_PATH=cgroup2, KMESH_RUN_DIR=str(run_dir))
    res = run(["sh", str(START_PRE)], env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert f"{bpffs} is already bpf" in res.stderr
    assert f"{cgroup2} is already cgroup2" in res.stderr
    assert "mounting" not in res.stderr
    assert mountinfo() == before
    assert not (run_dir / "mounts-made").exists()


# -- kmesh-stop-post.sh -------------------------------------------------------

@pytest.fixture
def stop_post_env(tmp_path: Path) -> dict:
    """A fake bpffs directory and a fake kmesh-daemon that logs its arguments."""
    daemon = tmp_path / "kmesh-daemon"
    daemon.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$(dirname "$0")/daemon-args"\n')
    daemon.chmod(0o755)
    (tmp_path / "bpf").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMESH_")}
    env.update(KMESH_BPF_FS_PATH=str(tmp_path / "bpf"), KMESH_DAEMON=str(daemon),
               SERVICE_RESULT="signal", EXIT_CODE="killed", EXIT_STATUS="KILL")
    return env


def fake_systemctl(tmp_path: Path, job: str | None) -> str:
    """A systemctl whose list-jobs shows ``job`` running on kmesh.service."""
    exe = tmp_path / "systemctl"
    line = f"42 kmesh.service {job} running" if job else ""
    exe.write_text(f'#!/bin/sh\n[ "$1" = list-jobs ] && [ -n "{line}" ] && echo "{line}"\nexit 0\n')
    exe.chmod(0o755)
    return str(exe)


def stop_post(tmp_path: Path, env: dict, job: str | None, **extra) -> subprocess.CompletedProcess:
    return run(["sh", str(STOP_POST), "kmesh.service"],
               env=dict(env, KMESH_SYSTEMCTL=fake_systemctl(tmp_path, job), **extra))


def test_stop_post_with_nothing_pinned_does_nothing(tmp_path: Path, stop_post_env: dict):
    res = stop_post(tmp_path, stop_post_env, "stop")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    assert not (tmp_path / "daemon-args").exists()


@pytest.mark.parametrize("job", ["restart", "try-restart"])
def test_stop_post_keeps_everything_for_a_restart(tmp_path: Path, stop_post_env: dict, job: str):
    (tmp_path / "bpf" / "bpf_kmesh" / "link").mkdir(parents=True)
    res = stop_post(tmp_path, stop_post_env, job)
    assert res.returncode == 0, res.stderr
    assert "restarting" in res.stderr and f"job={job}" in res.stderr
    assert not (tmp_path / "daemon-args").exists()


def test_stop_post_fails_static_after_a_crash(tmp_path: Path, stop_post_env: dict):
    (tmp_path / "bpf" / "bpf_kmesh" / "link").mkdir(parents=True)
    res = stop_post(tmp_path, stop_post_env, None)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert "failing static" in res.stderr and "result=signal" in res.stderr and "job=none" in res.stderr
    assert not (tmp_path / "daemon-args").exists()
    assert (tmp_path / "bpf" / "bpf_kmesh" / "link").is_dir()


def test_stop_post_cleans_up_on_stop(tmp_path: Path, stop_post_env: dict):
    (tmp_path / "bpf" / "bpf_kmesh").mkdir()
    res = stop_post(tmp_path, stop_post_env, "stop")
    assert res.returncode == 0, res.stderr
    args = (tmp_path / "daemon-args").read_text().splitlines()
    assert args == ["-bpf-fs-path", str(tmp_path / "bpf"), "cleanup"]


def test_stop_post_keep_mode_leaves_the_config_in_force(tmp_path: Path, stop_post_env: dict):
    (tmp_path / "bpf" / "bpf_kmesh").mkdir()
    res = stop_post(tmp_path, stop_post_env, "stop", KMESH_STOP_MODE="keep")
    assert res.returncode == 0, res.stderr
    assert "KMESH_STOP_MODE=keep" in res.stderr
    assert not (tmp_path / "daemon-args").exists()


# -- what kmesh mounted, and only that, is unmounted ---------------------------

def test_unmount_recorded_removes_only_what_kmesh_mounted(tmp_path: Path, monkeypatch):
    from kmesh import mounts

    monkeypatch.setenv("KMESH_RUN_DIR", str(tmp_path / "run"))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    theirs.mkdir()
    run(["mount", "-t", "bpf", "bpf", str(theirs)]).check_returncode()
    try:
        assert mounts.ensure_bpffs(str(ours)) is True
        assert mounts.ensure_bpffs(str(theirs)) is False      # already bpffs: not ours
        assert (tmp_path / "run" / "mounts-made").read_text() == f"{ours}\n"
        assert mounts.unmount_recorded() == [str(ours)]
        assert not os.path.ismount(ours) and os.path.ismount(theirs)
        assert not (tmp_path / "run" / "mounts-made").exists()
    finally:
        for d in (ours, theirs):
            if os.path.ismount(d):
                run(["umount", str(d)])
