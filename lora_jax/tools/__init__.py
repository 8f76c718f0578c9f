"""Tools: benchmarks, peers, the tiny demo model."""
