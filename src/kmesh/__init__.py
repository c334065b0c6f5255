"""kmesh: a sidecarless service-mesh data plane in the Linux kernel."""

__version__ = "0.1.0"
