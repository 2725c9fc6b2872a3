"""Triton Inference Server: model repositories, Python-backend models, a local tritonserver."""
