"""The Gradio demo's code (app.py at the repository root is its entry point): uploads, guardrails, saliency, UI.

Not part of the Hub model folder: the model package never imports this one. Research use only, not for diagnosis.
"""
