"""kmesh-cmd: load a config file into the running daemon."""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

import click

from kmesh import options


@click.command(context_settings={"help_option_names": ["-h", "--help", "-help"]})
@click.option("-config-file", "--config-file", "config_file", required=True, type=click.Path(dir_okay=False),
              help="Envoy v3 Bootstrap (YAML or JSON) to apply")
@click.option("-admin-address", "--admin-address", "admin_address", default=options.DEFAULT_ADMIN_ADDRESS,
              show_default=True, help="the daemon's admin API")
def main(config_file: str, admin_address: str):
    """Replace the running daemon's static config with FILE."""
    try:
        with open(config_file, "rb") as f:
            body = f.read()
    except OSError as e:
        click.echo(f"kmesh-cmd: {config_file}: {e.strerror}", err=True)
        sys.exit(2)
    req = urllib.request.Request(f"http://{admin_address}/controller/envoy", data=body, method="POST",
                                 headers={"Content-Type": "application/yaml",
                                          "X-Kmesh-Source": os.path.abspath(config_file)})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            res = json.load(resp)
    except urllib.error.HTTPError as e:
        res = json.load(e)
    except (urllib.error.URLError, OSError) as e:
        click.echo(f"kmesh-cmd: cannot reach kmesh-daemon at {admin_address}: {getattr(e, 'reason', e)}", err=True)
        sys.exit(3)
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
