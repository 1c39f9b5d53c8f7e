"""Architectures as transformers configs, safe saving and loading, fast generation."""
