"""The ``merge/*`` ops, one module per method family; importing this package registers them all."""

from mergesec.merging.methods import dare, linear, regmean, svd, ties

__all__ = ["dare", "linear", "regmean", "svd", "ties"]
