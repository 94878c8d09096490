"""Benchmark tooling for the AIOS Kernel: peers, load tools and baselines.

Modules here are independent of the kernel package (except the model builders
in ``kernel.testing.onnx_models``) so a baseline never moves when the kernel does.
"""
