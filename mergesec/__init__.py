"""mergesec: model-merging security studies as dependency-linked Ray Tune trials tracked in MLflow."""

__version__ = "0.1.0"
