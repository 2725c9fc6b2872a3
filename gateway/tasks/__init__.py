"""Task models: preprocess (tokenize) -> DynamicBatcher -> backend -> postprocess. No runtime imports."""
