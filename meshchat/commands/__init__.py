"""One module per CLI command; each exposes run_<name>(args) -> exit code."""
