"""Benchmarks of DESIGN §8's figures and the §6 fault matrix, on real local servers.

Run ``bash bench/run.sh`` (or ``python -m bench``); see docs/benchmarks.md.
"""
