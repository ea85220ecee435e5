"""Benchmarks: scripts that print/write JSON with ratios against baselines measured in the same run."""
