"""Datasets, views and seeded episodes."""
