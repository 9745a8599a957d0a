"""Causal language models on question/answer data: answer-only fine-tuning, generation, exact match."""
