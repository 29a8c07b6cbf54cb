"""Speed benchmarks against peers: `python -m bench.train_step`, `python -m bench.loader` (see README.md)."""
