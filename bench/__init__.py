"""Benchmarks of the tag job: throughput against a plain PyTorch loop, and memory as the catalog grows.

``make bench`` (``python -m bench.run``) and ``python -m bench.memory``; both write their figures into
docs/benchmarks.md. Generated catalogs and models live under bench/work/ (gitignored), raw JSON under
bench/results/raw/ (gitignored).
"""
