"""mergesec.attacks."""
