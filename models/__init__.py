"""Builders of the real models (MiniLM, digits CNN, demo, onnx light models) used by examples, tests and benchmarks."""
