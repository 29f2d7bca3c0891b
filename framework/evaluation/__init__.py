"""Evaluation: lm-evaluation-harness tasks on the inference engine (harness.py, tasks.py) and perplexity through the
engine's forward (perplexity.py)."""
