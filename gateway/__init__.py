"""Polyglot Gateway: a gRPC inference gateway for multilingual NLP models."""

__version__ = "0.1.0"
