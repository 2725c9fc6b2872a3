"""Runtimes behind the task models: ONNX Runtime in-process, Triton over gRPC."""
