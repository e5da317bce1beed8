"""Training side of the project: corpus building, training loop, reports (not uploaded with the model)."""
