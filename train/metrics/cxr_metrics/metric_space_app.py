"""Hugging Face Space of the metric: evaluate's standard widget (the Space id replaces the name on upload)."""

import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load("cxr_metrics")
launch_gradio_widget(module)
