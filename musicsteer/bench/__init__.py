"""Benchmarks: per-token latency, control-to-sound latency, steering quality."""
