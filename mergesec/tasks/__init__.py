"""Pipeline steps: one module per step (finetune, protect, attack, merge, evaluate, monitor).

Ops register when their modules are imported; ``mergesec.core.plugins.load_ops`` imports them all.
"""
