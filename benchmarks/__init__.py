"""Benchmarks: scripts that print tables and write JSON + PNG under ``benchmarks/results/``.

Run them all with ``python -m benchmarks.run [--quick]``; each is also ``python -m benchmarks.<name>``.
"""
