"""Merging as pure maths: state dicts in, state dicts out.

- ``per_key``: the contract every merge op follows (one tensor at a time) and its helpers;
- ``methods``: the ``merge/*`` ops, one module per method family, registered where defined;
- ``grams``: input Gram matrices of a model's Linear layers (for RegMean);
- ``stream``: out-of-core merging into safetensors files;
- ``search``: the candidates of a searched merge, merged into one live module.
"""
