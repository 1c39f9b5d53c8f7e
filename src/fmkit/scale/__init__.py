"""Scaling laws: ladder plans of pre-training runs, running them, and fitting L(N, D) to their losses."""
