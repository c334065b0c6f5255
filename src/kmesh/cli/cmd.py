"""kmesh-cmd: load a config file into the running daemon."""
from __future__ import annotations

import os
import sys

import click

from kmesh import options
from kmesh.admin import client


@click.command(context_settings={"help_option_names": ["-h", "--help", "-help"]})
@click.option("-config-file", "--config-file", "config_file", required=True, type=click.Path(dir_okay=False),
              help="Envoy v3 Bootstrap (YAML or JSON) to apply")
@click.option("-admin-address", "--admin-address", "admin_address", default=options.DEFAULT_ADMIN_ADDRESS,
              show_default=True, help="the daemon's admin API")
@click.option("-admin-socket", "--admin-socket", "admin_socket", default=None,
              help="the daemon's admin socket (default: the one the daemon at -admin-address names)")
def main(config_file: str, admin_address: str, admin_socket: str | None):
    """Replace the running daemon's static config with FILE."""
    try:
        with open(config_file, "rb") as f:
            body = f.read()
    except OSError as e:
        click.echo(f"kmesh-cmd: {config_file}: {e.strerror}", err=True)
        sys.exit(2)
    admin = client.Admin(admin_address, admin_socket)
    try:
        reply = admin.request("POST", "/controller/envoy", body, {"Content-Type": "application/yaml",
                                                                  "X-Kmesh-Source": os.path.abspath(config_file)})
    except client.Unreachable as e:
        click.echo(f"kmesh-cmd: {e.strerror}", err=True)
        sys.exit(3)
    try:
        res = reply.json()
    except ValueError:
        res = {}
    if reply.status == 403 or not isinstance(res, dict):
        click.echo(f"kmesh-cmd: {reply.status} {reply.error()}", err=True)
        sys.exit(1)
    for w in res.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    if res.get("result") != "applied":
        click.echo("kmesh-cmd: the daemon refused the config; the previous config stays in force:", err=True)
        for e in res.get("errors", []):
            click.echo(f"  {e}", err=True)
        sys.exit(1)
    click.echo(f"applied {config_file} as config version {res.get('config_version')}")


if __name__ == "__main__":
    main()
