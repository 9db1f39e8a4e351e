"""Evaluation: language-model loss and perplexity (lm.py)."""
