"""Whole documents: structure from real parsers, sentences from SaT, languages from lid.176, translation by
the engine, and reassembly that keeps everything but the translated words byte for byte.
"""
