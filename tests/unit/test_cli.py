"""kmesh-daemon accepts Kmesh's Go-style flags and GNU ones alike."""
from __future__ import annotations

import pytest

from kmesh.cli.daemon import main


def parse(*args: str) -> dict:
    ctx = main.make_context("kmesh-daemon", list(args))
    return ctx.params


def test_defaults():
    p = parse()
    assert p["enable_kmesh"] is True and p["enable_ads"] is True
    assert p["config_file"] == "/etc/kmesh/kmesh.yaml"
    assert p["bpf_fs_path"] == "/sys/fs/bpf"
    assert p["cgroup2_path"] == "/mnt/kmesh_cgroup2"
    assert p["admin_address"] == "127.0.0.1:15200"


@pytest.mark.parametrize("args,expected", [
    (["-enable-ads=false"], False),
    (["-enable-ads", "false"], False),
    (["--enable-ads=false"], False),
    (["--enable-ads", "0"], False),
    (["-enable-ads"], True),
    (["-enable-ads=true"], True),
])
def test_bool_spellings(args, expected):
    assert parse(*args)["enable_ads"] is expected


def test_go_style_values():
    p = parse("-enable-kmesh", "-enable-ads=false", "-config-file=/tmp/x.yaml", "-bpf-fs-path", "/sys/fs/bpf/t",
              "--cgroup2-path=/sys/fs/cgroup/unified/t", "-admin-address=127.0.0.1:1", "-log-level=debug")
    want = {"enable_kmesh": True, "enable_ads": False, "config_file": "/tmp/x.yaml",
                 "bpf_fs_path": "/sys/fs/bpf/t", "cgroup2_path": "/sys/fs/cgroup/unified/t",
                 "admin_address": "127.0.0.1:1", "log_level": "debug"}
    assert {k: p[k] for k in want} == want


def test_ads_flags():
    p = parse("-xds-address=127.0.0.1:15010", "-service-node", "sidecar~1.2.3.4~a.b~b.svc.cluster.local",
              "--xds-ready-timeout=2.5", "-xds-ca-file=/etc/ca.pem")
    assert p["xds_address"] == "127.0.0.1:15010" and p["xds_ready_timeout"] == 2.5
    assert p["service_node"].startswith("sidecar~") and p["xds_ca_file"] == "/etc/ca.pem"


def test_bad_bool_is_refused():
    import click

    with pytest.raises(click.BadParameter):
        parse("-enable-ads=maybe")
