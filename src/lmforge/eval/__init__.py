"""Evaluation: language-model scores (lm.py), task metrics (metrics.py), running them on a run (tasks.py) and
writing the JSON, markdown and plots of `lmforge eval` (report.py)."""
