"""Configuration: Envoy v3 resources in, kmesh's own model out."""
