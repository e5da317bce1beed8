"""The project's internal shared layer: what both the app (cxr_app) and training (train) use, written once.

- `atomic`: writes that a reader or a crash sees whole or not at all (files, folders).
- `report`: the test report's file names, its schema (typed) and the one renderer of its numbers and tables, used
  by training (report.md, the model card) and by the app's Model report tab.

It imports nothing of the project, and nothing here is shipped in a Hub model folder (the model package stays
self-contained); the Space carries it because the app needs it.
"""
