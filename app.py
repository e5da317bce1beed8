"""Gradio demo of the CNN-LSTM chest X-ray classifier (research use only, not for diagnosis).

    python app.py [--model PATH_OR_HUB_ID] [--revision REV] [--port N] [--host ADDRESS]

Without --model the app serves $CNN_LSTM_MODEL (+ $CNN_LSTM_REVISION), else checkpoints/cnn-lstm-cxr3 beside this
file. The app's code is the cxr_app package (cxr_app/demo.py); `demo` is built at import so that Hugging Face
Spaces and `gradio app.py` find it.

Public deployment settings (environment, e.g. Space variables): $CNN_LSTM_DELETE_CACHE = "FREQUENCY,AGE" seconds
between sweeps of uploads and results / their age when deleted (default "300,600": gone within 15 minutes);
$CNN_LSTM_PROXY_HOPS = trusted reverse proxies in front of the app (default 1 on a Space, else 0), whose
X-Forwarded-For entry names the client for the per-client limits; $CNN_LSTM_RATE_LIMITS=off turns those limits off;
$CNN_LSTM_SLOW_MAP_NICE = how much lower the priority of Integrated Gradients / Occlusion is (default 10, 0 = same).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HOME = Path(__file__).resolve().parent  # holds checkpoints/ and examples/ (in the repository and in the Space)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: $CNN_LSTM_MODEL, else the repo's)")
    parser.add_argument("--revision", help="Hub revision (default: $CNN_LSTM_REVISION)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--host", default=None, help="address to listen on (default: 127.0.0.1)")
    return parser.parse_args(argv)


logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
ARGS = parse_args() if __name__ == "__main__" else None

from cxr_app.demo import build_demo, launch  # noqa: E402 - after argument parsing: --help stays fast

demo = build_demo(model=ARGS.model, revision=ARGS.revision, home=HOME) if ARGS else build_demo(home=HOME)

if __name__ == "__main__":
    launch(demo, port=ARGS.port, host=ARGS.host)
