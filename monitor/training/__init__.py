"""Synthetic builds, datasets, training and evaluation."""
