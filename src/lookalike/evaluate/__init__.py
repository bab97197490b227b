"""Evaluation: protocols, metrics and dataset readers."""
