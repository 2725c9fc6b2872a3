"""Triton Python-backend model for a translation export, written by `pgw export --triton`.

The code lives in the polyglot-gateway package, which must be installed in the Python that runs
Triton's stub (its environment's `bin` first on PATH when tritonserver starts)."""

from gateway.triton.python_models import TranslationModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
