"""Evaluation: tasks, metrics, the runner, the code sandbox, judges and contamination checks."""
