"""mergesec.orchestrator."""
