"""Benchmarks: statesweep against a plain DELETE and the upstream SELECT/DELETE loop.

Run with ``python -m bench.run`` (``make bench`` / ``make bench-quick``). Every method runs on
the same data, reloaded to the same physical state before each one, and must reach the same end
state. Benchmarks report; they never fail the test suite on timing.
"""
