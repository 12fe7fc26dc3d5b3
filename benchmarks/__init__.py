"""Benchmarks of cio-outbox, side by side with the official library and the machine's ceiling.

Run ``python -m benchmarks`` (see benchmarks/README.md).
"""
