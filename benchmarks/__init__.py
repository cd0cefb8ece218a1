"""Benchmarks of the fused LM-head kernels against naive PyTorch and peer libraries.

Run the scripts directly (``python benchmarks/bench_logprobs.py --help``); see
benchmarks/README.md. This package is not installed with ``drdo``.
"""
