"""Benchmarks of ccat-dt against the command-line tools and at OpsDB scale (`make bench`).

Run `python -m bench`; docs/benchmarks.md says what is measured and how to size it.
"""
