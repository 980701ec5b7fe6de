"""Scoring a model: greedy generation on a task's held-out examples, and an lm-evaluation-harness model."""
