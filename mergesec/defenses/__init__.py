"""mergesec.defenses."""
