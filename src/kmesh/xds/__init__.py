"""ADS (aggregated xDS, state of the world) client: kmesh as a control plane's data plane."""
