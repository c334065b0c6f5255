"""The admin HTTP API (loopback by default)."""
