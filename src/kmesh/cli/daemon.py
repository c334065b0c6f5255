"""kmesh-daemon: accepts Kmesh's Go-style flags (``-enable-ads=false``) and GNU
ones (``--enable-ads=false``, ``--enable-ads false``)."""
from __future__ import annotations

import sys

import click

from kmesh import __version__, limits, log as kmlog, options
from kmesh.config.errors import ConfigError

_BOOL = dict(type=click.BOOL, is_flag=False, flag_value=True)


def _features_spec(spec: str) -> str:
    from kmesh.bpf.features import parse_disabled

    try:
        parse_disabled(spec)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return spec


def _opt(name: str, **kw):
    return click.option(f"-{name}", f"--{name}", name.replace("-", "_"), show_default=True, **kw)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help", "-help"]})
@_opt("enable-kmesh", default=True, help="run the kernel-native data path", **_BOOL)
@_opt("enable-ads", default=True, help="get config over xDS from a control plane (false: standalone)", **_BOOL)
@_opt("config-file", default=options.DEFAULT_CONFIG_FILE, help="Envoy v3 Bootstrap, YAML or JSON")
@_opt("bpf-fs-path", default=options.DEFAULT_BPF_FS_PATH, help="bpffs mount; pins go to <path>/bpf_kmesh/")
@_opt("cgroup2-path", default=options.DEFAULT_CGROUP2_PATH,
      help="cgroup where kmesh's programs attach: the workloads it can govern (mounted as cgroup2 when it is not)")
@_opt("workloads", default="all", type=click.Choice(["all", "enrolled"]),
      help="all: every process under -cgroup2-path is governed (unless bypassed); enrolled: only the workloads "
      "enrolled by cgroup, unit, PID or network namespace (kmeshctl enroll)")
@_opt("admin-address", default=options.DEFAULT_ADMIN_ADDRESS, help="admin API HOST:PORT on loopback: any local "
      "user may read, only root may change (empty: off)")
@_opt("admin-socket", default=options.DEFAULT_ADMIN_SOCKET, help="admin API Unix socket (mode 0660): the whole API "
      "for root and -admin-group; kmeshctl and kmesh-cmd use it (empty: off)")
@_opt("admin-group", default="", help="a group (name or gid) whose members may change kmesh over -admin-socket")
@_opt("metrics-address", default=options.DEFAULT_METRICS_ADDRESS, help="HOST:PORT serving /metrics and nothing "
      "else, for Prometheus (empty: off; /metrics stays on the admin API)")
@_opt("log-level", default="info", type=click.Choice(list(kmlog.LEVELS), case_sensitive=False))
@_opt("track-connections", default=True, help="remember each redirected socket so that closes are counted "
      "(kmesh_tcp_connections_closed/active); ~200 ns per connect", **_BOOL)
@_opt("access-log", default=False, help="a JSON line per closed connection (also POST /accesslog/on|off, "
      "kmeshctl accesslog on|off)", **_BOOL)
@_opt("access-log-file", default="", help="where access log lines go (default: stdout, journald under systemd)")
@_opt("access-log-rate", default=1000, type=int, help="access log lines per second at most; more are dropped "
      "and counted")
@_opt("l7-address", default=options.DEFAULT_L7_ADDRESS, help="the hand-off listener for HTTP routes that need "
      "the request (host, path, headers): connections to such listeners come here and are routed per request; "
      "empty turns L7 off (such listeners then take their catch-all route in the kernel)")
@_opt("l7-splice-budget", default=256 * 1024, type=click.IntRange(min=0), help="routed L7 connections are "
      "spliced in the kernel; this many bytes per direction may wait for a slow reader there before the daemon "
      "takes the excess with TCP backpressure (kernel memory per connection); 0 relays every L7 connection in "
      "the daemon instead")
@_opt("l7-engine", default="python", type=click.Choice(["python", "native"]), help="what carries L7 "
      "connections: native, a C thread of the daemon (Python decides each request; what needs more is handed to "
      "the Python side: docs/l7.md), or python, the daemon's asyncio loop for all of them")
@_opt("l7-max-waiting-heads", default=limits.L7_PENDING_HEADS.value, type=click.IntRange(min=1),
      help="hand-off connections that may wait for their request head at once; past it the one waiting longest "
      "is closed (slow clients cannot crowd out others; kmesh_limit_hits_total{limit=\"l7_pending_heads\"})")
@_opt("bpf-stats", default=False, help="count every BPF program's runs and run time while the daemon runs "
      "(kmesh_bpf_program_runs_total; kernel-wide, ~20-40 ns per program run)", **_BOOL)
@_opt("bpf-disable-features", default="", callback=lambda _c, _p, v: _features_spec(v),
      help="kernel features to do without even where the kernel has them, comma-separated "
      "(atomic_fetch, l7_splice, sockmap_link, connect_timeout_subsecond): runs the fallbacks of older kernels")
@click.option("-enable-sockmap", "--enable-sockmap", "-enable-mda", "--enable-mda", "enable_sockmap", default=False,
              show_default=True, help="accelerate same-host TCP connections with sockops + sk_msg "
              "(Kmesh's mda); false turns it off, also when an earlier run left it on", **_BOOL)
@_opt("xds-address", default="", help="control plane HOST:PORT (else $XDS_ADDRESS, the bootstrap's "
      "ads_config, then istiod.istio-system.svc:15010)")
@_opt("xds-ca-file", default="", help="CA bundle: use TLS to the control plane ($XDS_CA_FILE)")
@_opt("xds-cert-file", default="", help="client certificate for mutual TLS ($XDS_CERT_FILE)")
@_opt("xds-key-file", default="", help="client key for mutual TLS ($XDS_KEY_FILE)")
@_opt("service-node", default="", help="node id presented to the control plane "
      "(default sidecar~$INSTANCE_IP~$POD_NAME.$POD_NAMESPACE~$POD_NAMESPACE.svc.cluster.local)")
@_opt("service-cluster", default="", help="node cluster presented to the control plane")
@_opt("xds-ready-timeout", default=30.0, type=float,
      help="seconds to wait for the control plane's first full config before reporting ready")
@click.version_option(__version__, "-version", "--version")
@click.pass_context
def main(ctx, **kw):
    """Run the kmesh data-plane daemon."""
    opts = options.Options(**kw)
    ctx.obj = opts
    if ctx.invoked_subcommand is not None:
        return
    kmlog.setup(opts.log_level)
    from kmesh import memory

    memory.tune()   # before gRPC starts its threads
    from kmesh.daemon import Daemon, StartError  # heavy imports only when running

    d = Daemon(opts)
    try:
        d.start()
    except ConfigError as e:
        d.abort()
        click.echo(f"kmesh-daemon: config rejected, nothing was changed:\n{e}", err=True)
        sys.exit(2)
    except StartError as e:
        d.abort()
        click.echo(f"kmesh-daemon: cannot start: {e}", err=True)
        sys.exit(1)
    sys.exit(d.run())


@main.command()
@click.option("--force", is_flag=True, help="clean up even while a daemon is running")
@click.option("--unmount", is_flag=True, help="also unmount the bpffs and cgroup2 mounts kmesh made (uninstall)")
@click.pass_obj
def cleanup(opts: options.Options, force: bool, unmount: bool):
    """Detach kmesh's programs and remove its pins (to turn kmesh off after a
    stop that kept them, after a crash, or to uninstall)."""
    kmlog.setup(opts.log_level)
    from kmesh.bpf.loader import in_use
    from kmesh.dataplane.pins import cleanup as do_cleanup

    if in_use(opts.bpf_fs_path) and not force:
        click.echo(f"kmesh-daemon: a running daemon holds {opts.bpf_fs_path}/bpf_kmesh: stop it "
                   "(systemctl stop kmesh), or pass --force", err=True)
        sys.exit(1)
    removed = do_cleanup(opts.bpf_fs_path)
    click.echo(f"removed {len(removed)} pins under {opts.bpf_fs_path}/bpf_kmesh")
    if unmount:
        from kmesh.mounts import unmount_recorded

        for path in unmount_recorded():
            click.echo(f"unmounted {path} (mounted by kmesh)")


@main.command("kernel-features")
@click.option("--probe", "raw", is_flag=True, help="print the raw probe results (as recorded in the kernel matrix)")
@click.pass_obj
def kernel_features(opts: options.Options, raw: bool):
    """What this kernel's BPF offers and which kmesh features are on (JSON)."""
    import json

    from kmesh.bpf import features

    p = features.probe()
    f = features.without(features.decide(p), features.parse_disabled(opts.bpf_disable_features))
    out = p.as_dict() if raw else {**f.as_dict(), "missing": list(f.missing)}
    click.echo(json.dumps(out, indent=2, sort_keys=True))
    sys.exit(1 if f.missing else 0)


if __name__ == "__main__":
    main()
