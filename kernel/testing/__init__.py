"""Helpers shared by the test suite, the benchmarks and the demo: small ONNX models built in-process."""
