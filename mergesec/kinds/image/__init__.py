"""Image classification with CLIP-style models: zero-shot heads, the image classifier, training."""
