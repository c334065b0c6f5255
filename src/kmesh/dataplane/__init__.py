"""From the model to the BPF maps: diff planning (pure) and applying (I/O)."""
