"""Models: loading by URI, state-dict and safetensors IO, per-family transformer layouts."""
