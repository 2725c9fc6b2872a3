"""Data files shipped with the package: FLORES-200 codes and a multilingual sample text."""
