"""kmesh-cni: the CNI plugin that enrolls containers (plugin, standard
library only) and its installer (install)."""
from __future__ import annotations

import os
import sys


def main() -> int:
    """The ``kmesh-cni`` command: the plugin when a runtime runs it
    (CNI_COMMAND set), else ``kmesh-cni install|uninstall ...``."""
    if "CNI_COMMAND" in os.environ or not sys.argv[1:]:
        from kmesh.cni import plugin
        return plugin.main()
    from kmesh.cni import install
    return install.main(sys.argv[1:])
