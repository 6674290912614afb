"""Benchmark scripts, each run from the repository root as ``python -m bench.<name>``.

Each prints a table with the peer measured in the same run; its last stdout line is one JSON object.
``bench._servers`` holds what several of them share (server specs, the baseline tree, the model dir).
"""
