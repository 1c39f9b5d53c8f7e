"""Choosing among models: compare candidates on the same items with paired statistics, pick one under constraints."""
