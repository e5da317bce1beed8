"""The fast-path trial in a process of its own: `python -m cxr_app.fast_path_trial SOURCE [REVISION] --threads N`
loads the model, lets `fast_cpu_inference("auto")` time every CPU candidate against eager fp32 (channels_last, ONNX
Runtime, bf16 where the CPU has it natively) and prints one JSON line: backend, reason, timings.

Why a process: the trial builds every candidate (copies, an ONNX export), which leaves the app ~500 MB larger for
good (measured: 1,045 -> 1,595 MB, 1,350 after malloc_trim); here that memory goes back when the process exits, and
the app then builds only the winner (cxr_app/loading.py `choose_fast_path`).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("revision", nargs="?")
    parser.add_argument("--threads", type=int, required=True, help="the app's torch thread count")
    args = parser.parse_args(argv)
    import torch

    from modeling_cnn_lstm.modeling_cnn_lstm import CnnLstmForImageClassification

    torch.set_num_threads(args.threads)
    model = CnnLstmForImageClassification.from_pretrained(args.source, revision=args.revision).eval()
    runner = model.fast_cpu_inference("auto")
    print(json.dumps({"backend": runner.backend, "reason": runner.reason, "timings": runner.timings}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
