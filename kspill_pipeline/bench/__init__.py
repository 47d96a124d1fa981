"""Benchmarks (``make bench``): each reports ratios against a reference measured in the same run."""
