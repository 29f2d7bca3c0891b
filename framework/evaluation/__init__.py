"""Evaluation: lm-evaluation-harness tasks on the inference engine (harness.py, tasks.py)."""
