"""Benchmarks behind ``dicomlake bench``; each prints one JSON object with ``--json``."""
