"""Benchmarks: each case measures ours against its peers in one run, alternating, and reports ratios."""
