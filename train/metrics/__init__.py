"""Evaluation metric modules of the project (each folder loads with `evaluate.load(path)` and publishes alone)."""
