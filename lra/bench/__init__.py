"""lra-bench: efficiency and approximation benchmarks of the attention backends (see `lra-bench --help`)."""
