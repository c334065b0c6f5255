"""kmeshctl: what the data plane is doing, from kmesh-daemon's admin API.

    kmeshctl version                 client and daemon versions
    kmeshctl dump [-o json]          listeners and clusters as the BPF maps hold them
    kmeshctl stats [--once]          busiest clusters and endpoints, refreshing (top-like)
    kmeshctl log --level LEVEL       change the daemon's log level at runtime
    kmeshctl accesslog on|off|status switch the per-connection access log
    kmeshctl enroll|bypass|unenroll --cgroup PATH|--unit NAME|--pid N|--netns PATH
    kmeshctl list                    which workloads kmesh governs (docs/workloads.md)

It reads from the admin API (``--admin``, default $KMESH_ADMIN or
127.0.0.1:15200), which needs no privileges. Changes (log, accesslog,
enroll...) go to the daemon's admin socket (/run/kmesh/admin.sock), open to
root and the daemon's -admin-group. While no daemon runs, enroll/bypass/
unenroll write the pinned km_workloads map directly (root only); the next
daemon takes it from there.
"""
from __future__ import annotations

import json
import sys
import time
import urllib.parse

import click

from kmesh import __version__, options
from kmesh.admin import client
from kmesh.bpf import mapnames


class AdminError(click.ClickException):
    exit_code = 2


class Unreachable(AdminError):
    """Nothing answers at the admin address."""


def _request(admin: client.Admin, path: str, method: str = "GET") -> bytes:
    try:
        r = admin.request(method, path)
    except client.Unreachable as e:
        raise Unreachable(f"{e.strerror}; is it running? (systemctl status kmesh; or pass --admin HOST:PORT)") \
            from None
    if r.status >= 400:
        raise AdminError(f"{method} {path} ({admin.where(method)}): {r.status} {r.error()}")
    return r.body


def _get_json(admin: client.Admin, path: str):
    return json.loads(_request(admin, path))


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--admin", envvar="KMESH_ADMIN", default=options.DEFAULT_ADMIN_ADDRESS, show_default=True,
              help="kmesh-daemon's admin address ($KMESH_ADMIN)")
@click.option("--admin-socket", envvar="KMESH_ADMIN_SOCKET", default=None,
              help="the daemon's admin socket, for everything ($KMESH_ADMIN_SOCKET; default: for changes, the "
              "one the daemon at --admin names)")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
def main(ctx, admin: str, admin_socket: str | None, output: str):
    """Look into a running kmesh-daemon."""
    ctx.obj = {"admin": client.Admin(admin, admin_socket, timeout=10), "output": output}


@main.command()
@click.pass_obj
def version(obj):
    """Client and daemon versions."""
    daemon = _get_json(obj["admin"], "/version")["version"]
    if obj["output"] == "json":
        click.echo(json.dumps({"client": __version__, "daemon": daemon}))
    else:
        click.echo(f"kmeshctl {__version__}\nkmesh-daemon {daemon}")


@main.command()
@click.pass_obj
def ready(obj):
    """Exit 0 when the daemon serves its config (GET /ready): a probe for
    a DaemonSet or a script."""
    click.echo(_request(obj["admin"], "/ready").decode().strip())


@main.command()
@click.pass_obj
def dump(obj):
    """Listeners and clusters as the BPF maps hold them."""
    maps = _get_json(obj["admin"], "/bpf/kmesh/maps")
    status = _get_json(obj["admin"], "/status")
    if obj["output"] == "json":
        click.echo(json.dumps({"status": status, "maps": maps}, indent=2, sort_keys=True))
        return
    clusters = maps.get(mapnames.CLUSTER, {})
    click.echo(f"config version {status.get('config_version')} ({status.get('mode')}), "
               f"{status.get('listeners')} listener addresses, {status.get('clusters')} clusters\n")
    rows = []
    for addr, rec in sorted(maps.get(mapnames.LISTENER, {}).items()):
        total = rec["total_weight"] or 1
        rows.append([addr, ", ".join(
            f"{clusters.get(str(c['cluster_id']), {}).get('name') or c['cluster_id']} "
            f"({100 * c['weight'] / total:.0f}%)" for c in rec["clusters"])])
    click.echo(_table(rows, ["LISTENER", "CLUSTERS"]))
    click.echo()
    rows = [[cid, c.get("name") or "-", c["lb_policy"], ", ".join(
        f"{e['address']}" + (f" w={e['weight']}" if e["weight"] != 1 else "") for e in c["endpoints"])]
        for cid, c in sorted(clusters.items(), key=lambda kv: int(kv[0]))]
    click.echo(_table(rows, ["ID", "CLUSTER", "LB", "ENDPOINTS"]))


_STATS_FAMILIES = {"kmesh_tcp_connections_opened": "opened", "kmesh_tcp_connections_closed": "closed",
                   "kmesh_tcp_connections_failed": "failed", "kmesh_tcp_connections_active": "active",
                   "kmesh_tcp_received_bytes": "bytes_in", "kmesh_tcp_sent_bytes": "bytes_out"}


def _scrape(admin: client.Admin) -> dict[str, dict]:
    """destination_cluster -> {"opened", "closed", "failed", "active",
    "bytes_in", "bytes_out", "endpoints": {ep: {...}}} from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    def zero() -> dict:
        return dict.fromkeys(_STATS_FAMILIES.values(), 0)

    out: dict[str, dict] = {}
    for fam in text_string_to_metric_families(_request(admin, "/metrics").decode()):
        kind = _STATS_FAMILIES.get(fam.name)
        if not kind:
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            c = out.setdefault(s.labels["destination_cluster"], {**zero(), "endpoints": {}})
            c[kind] += s.value
            c["endpoints"].setdefault(s.labels["endpoint"], zero())[kind] += s.value
    return out


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _stats_rows(now: dict, before: dict | None, seconds: float, top: int) -> list[list]:
    rows = []
    for name, c in now.items():
        rate = (c["opened"] - before[name]["opened"]) / seconds if before and name in before else None
        rows.append((rate or 0, c["opened"], [name, f"{rate:.1f}" if rate is not None else "-",
                                              int(c["active"]), int(c["opened"]), int(c["closed"]),
                                              int(c["failed"]), _size(c["bytes_in"]), _size(c["bytes_out"]),
                                              len(c["endpoints"])]))
    rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
    return [r[2] for r in rows[:top]]


@main.command()
@click.option("--once", is_flag=True, help="print one table and exit (for scripts)")
@click.option("--interval", default=2.0, show_default=True, help="seconds between refreshes")
@click.option("--top", default=20, show_default=True, help="clusters shown")
@click.pass_obj
def stats(obj, once: bool, interval: float, top: int):
    """The busiest clusters: new connections per second, active, opened,
    closed, failed, bytes from the clients (IN) and to them (OUT)."""
    header = ["CLUSTER", "CONN/S", "ACTIVE", "OPENED", "CLOSED", "FAILED", "IN", "OUT", "ENDPOINTS"]
    before, t_before = None, 0.0
    while True:
        now, t_now = _scrape(obj["admin"]), time.monotonic()
        if obj["output"] == "json":
            click.echo(json.dumps(now, sort_keys=True))
        else:
            rows = _stats_rows(now, before, t_now - t_before, top)
            if not once:
                click.echo("\x1b[2J\x1b[H", nl=False)   # clear the screen, like top
            click.echo(_table(rows, header) if rows else "no connections redirected yet")
        if once:
            return
        before, t_before = now, t_now
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return


@main.command()
@click.option("--level", required=True, type=click.Choice(["debug", "info", "warn", "error"]))
@click.pass_obj
def log(obj, level: str):
    """Change the daemon's log level at runtime (until it restarts)."""
    got = json.loads(_request(obj["admin"], f"/logging?level={level}", method="POST"))
    click.echo(json.dumps(got) if obj["output"] == "json" else f"log level is now {got['level']}")


@main.command()
@click.argument("state", type=click.Choice(["on", "off", "status"]))
@click.pass_obj
def accesslog(obj, state: str):
    """Switch the access log (a JSON line per closed connection) on or off."""
    if state == "status":
        got = _get_json(obj["admin"], "/accesslog")
    else:
        got = json.loads(_request(obj["admin"], f"/accesslog/{state}", method="POST"))
    if obj["output"] == "json":
        click.echo(json.dumps(got))
    else:
        click.echo(f"access log {'on' if got['enabled'] else 'off'} ({got.get('to', '-')}): "
                   f"{got.get('written', 0)} lines written, {got.get('rate_dropped', 0)} dropped by the rate limit")


@main.command()
@click.pass_obj
def l7(obj):
    """The L7 hand-off listener: connections routed, answered, spliced."""
    got = _get_json(obj["admin"], "/l7")
    if obj["output"] == "json" or not got.get("enabled"):
        click.echo(json.dumps(got, indent=2, sort_keys=True) if obj["output"] == "json" else "L7 is off")
        return
    sp = got.get("splice") or {}
    rows = [["accepted", got["accepted"]], ["requests routed", got["routed"]],
            ["keep-alive, routed per request", f"{got.get('per_request', 0)} ({got.get('resumed', 0)} taken over "
             "at start)"],
            ["answered here", ", ".join(f"{k}: {v}" for k, v in got["answered"].items()) or "0"],
            ["denied (RBAC)", got.get("denied", 0)], ["upstream failures", got["upstream_failures"]],
            ["bad requests", got["bad_requests"]]]
    if sp:
        rows += [["spliced", f"{sp['spliced']} ({sp['active']} open, {sp['adopted']} taken over at start)"],
                 ["relayed by the daemon", f"{sp['not_spliceable']} connections; {_size(sp['passed_bytes'])} "
                  "of spliced ones over the budget"],
                 ["repeats dropped", _size(sp["repeated_bytes"])]]
    else:
        rows.append(["spliced", "no (-l7-splice-budget=0: the daemon relays)"])
    click.echo(f"hand-off listener {got['address']}\n")
    click.echo(_table(rows, ["", ""]))


_SELECTORS = ("cgroup", "unit", "pid", "netns")


def _workload_selector(kw: dict) -> dict[str, str]:
    given = {k: str(v) for k, v in kw.items() if k in _SELECTORS and v is not None}
    if len(given) != 1:
        raise click.UsageError("name the workload by one of --cgroup PATH, --unit NAME, --pid N or --netns PATH")
    return given


def _workloads_out(obj, got: dict, said: str | None = None) -> None:
    if obj["output"] == "json":
        click.echo(json.dumps(got, indent=2, sort_keys=True))
        return
    if said:
        click.echo(said)
    if "default" in got:
        click.echo(f"governed: {'every process under ' + got['scope'] if got['default'] == 'all' else 'enrolled'}"
                   " workloads, less the bypassed ones")
    l7 = {n["inode"] for n in got.get("namespaces", [])}
    rows = [[w["mode"] + (" (-workloads=all)" if w.get("scope") else ""), w["kind"], w["path"], w["id"],
             ("yes" if w["id"] in l7 else "no") if w["kind"] == "netns" and w["mode"] == "enrolled" else "-"]
            for w in got.get("workloads", [])]
    click.echo(_table(rows, ["MODE", "BY", "PATH", "ID", "L7 LISTENER"]) if rows else "no workloads enrolled")


def _workload_options(f):
    f = click.option("--bpf-fs-path", default="/sys/fs/bpf", show_default=True,
                     help="where kmesh's pins are: written directly while no daemon runs")(f)
    f = click.option("--netns", help="a network namespace: /run/netns/NAME, a CNI's bind mount, /proc/PID/ns/net")(f)
    f = click.option("--pid", type=int, help="a process: its network namespace if it has one of its own "
                     "(a pod, a container), else its cgroup")(f)
    f = click.option("--unit", help="a systemd unit (running): its cgroup")(f)
    return click.option("--cgroup", help="a cgroup2 directory, absolute or under the cgroup2 mount")(f)


def _enrollment(obj, action: str, kw: dict) -> None:
    selector = _workload_selector(kw)
    query = "&".join(f"{k}={urllib.parse.quote(v, safe='/')}" for k, v in selector.items())
    try:
        got = json.loads(_request(obj["admin"], f"/workloads/{action}?{query}", method="POST"))
        how = ""
    except Unreachable as e:
        got, how = _enroll_offline(action, selector, kw["bpf_fs_path"], e), " (no daemon: written to the pinned map)"
    w = got["workload"]
    said = f"{action}ed {w['kind']} {w['path']}{'' if got['changed'] else ' (no change)'}{how}"
    _workloads_out(obj, got, said)


def _enroll_offline(action: str, selector: dict, bpf_fs_path: str, unreachable: Unreachable) -> dict:
    """What the daemon would do, on the pinned map (the kernel governs by it
    at once; the next daemon opens the namespaces' listeners)."""
    from kmesh.bpf import loader
    from kmesh.dataplane import workloads as wl

    try:
        kind, path = wl.name(selector)
        with wl.pinned_store(bpf_fs_path) as store:
            if action == "unenroll":
                w = store.named(kind, path)
                if w is not None:
                    store.remove(w)
                return {"workload": w.as_dict() if w else {"kind": kind.name.lower(), "path": path},
                        "changed": w is not None, "workloads": [x.as_dict() for x in store.all()]}
            w = wl.Workload(kind, wl.identify(kind, path), path,
                            wl.Mode.ENROLLED if action == "enroll" else wl.Mode.BYPASS)
            before = store.get(kind, w.id)
            store.put(w)
            return {"workload": w.as_dict(), "changed": before is None or before.mode != w.mode,
                    "workloads": [x.as_dict() for x in store.all()]}
    except loader.LoaderError:
        raise unreachable from None   # a daemon holds the pins: it is the admin address that is wrong
    except PermissionError as e:
        raise AdminError(f"{unreachable.message}; writing the pinned map instead needs root ({e})") from None
    except (ValueError, OSError) as e:
        raise AdminError(f"{unreachable.message}; and the pinned map: {e}") from None


@main.command()
@_workload_options
@click.pass_obj
def enroll(obj, **kw):
    """Enroll a workload: its connections to services are governed (and, by
    network namespace, routed at L7 too)."""
    _enrollment(obj, "enroll", kw)


@main.command()
@_workload_options
@click.pass_obj
def bypass(obj, **kw):
    """Bypass a workload: never governed, even inside an enrolled one."""
    _enrollment(obj, "bypass", kw)


@main.command()
@_workload_options
@click.pass_obj
def unenroll(obj, **kw):
    """Forget what was said of a workload (its open connections go on)."""
    _enrollment(obj, "unenroll", kw)


@main.command(name="list")
@click.pass_obj
def list_(obj):
    """Which workloads are enrolled and bypassed."""
    _workloads_out(obj, _get_json(obj["admin"], "/workloads"))


if __name__ == "__main__":
    sys.exit(main())
