"""BPF side of the daemon: libbpf binding, map records, program loader."""
