"""The application layer: the `tiergate` command line, the demo (`make run`) and the benchmark (`make bench`)."""
