"""Lets `train.metrics.cxr_metrics.cxr_metrics` import as a package module (the report reuses its numpy core)."""
