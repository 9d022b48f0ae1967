"""Benchmarks: the process harness, speed and memory, quality (beds, corpora, upcycling)."""
