"""The core layer: the op registry, the node context and the protocols at the seams.

Nothing here imports another mergesec package or torch at import time.
"""
