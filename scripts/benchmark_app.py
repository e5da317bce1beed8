"""Latency of the app's functions on real X-rays, and 8 concurrent API users against a launched server.

    python scripts/benchmark_app.py                                   # paper-size model (checkpoint or random init)
    python scripts/benchmark_app.py --model checkpoints/cnn-lstm-cxr3 --threads 2 --slow_repeats 10

Times exactly what the UI calls (`CxrDemo.predict`, `CxrDemo.explain` at the default settings), each on a different
real X-ray, after one warm-up call: predict, predict + Grad-CAM, predict + Integrated Gradients, predict + Occlusion;
p50/p95 per torch thread count. Then launches the app on 127.0.0.1 and lets `users` gradio_client users upload
concurrently (predict then Grad-CAM, like the UI), counting errors. Targets (2-core CPU): predict <= 0.5 s,
predict + Grad-CAM <= 1.5 s, IG and Occlusion <= 15 s, no errors with 8 users.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from cxr_app.demo import CxrDemo, build_demo, default_checkpoint, launch
from cxr_app.saliency import GRAD_CAM, INTEGRATED_GRADIENTS, OCCLUSION

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "cxr3"
TARGETS = {"predict": 0.5, f"predict + {GRAD_CAM}": 1.5, f"predict + {INTEGRATED_GRADIENTS}": 15.0,
           f"predict + {OCCLUSION}": 15.0}


@dataclass
class BenchmarkAppArguments:
    model: str | None = field(default=None, metadata={"help": "Checkpoint or Hub id; default: the repo's, else a "
                                                               "randomly initialised paper-size model."})
    data_dir: str = field(default=str(DEFAULT_DATA_DIR), metadata={"help": "Real X-rays in the cxr3 layout."})
    threads: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "torch thread counts to time."})
    fast_repeats: int = field(default=20, metadata={"help": "Timed calls of predict and predict + Grad-CAM."})
    slow_repeats: int = field(default=5, metadata={"help": "Timed calls of predict + IG and predict + Occlusion."})
    users: int = field(default=8, metadata={"help": "Concurrent gradio_client users (0: skip the server check)."})
    requests_per_user: int = field(default=2, metadata={"help": "Uploads per user (each: predict, then Grad-CAM)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights when there is no checkpoint."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the results here."})


def real_xrays(data_dir: str, count: int) -> list[Path]:
    """`count` X-rays spread over labels and sources (sorted, evenly spaced: the same set on every run)."""
    paths = sorted(Path(data_dir).glob("images/*/*.jpg"))
    if not paths:
        raise SystemExit(f"no X-rays under {data_dir}/images/<label>/*.jpg")
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(count, len(paths)))]


def load_app(model: str | None, seed: int, tmp: Path) -> tuple[CxrDemo, str]:
    if model is None and default_checkpoint(REPO_ROOT).is_dir():
        model = str(default_checkpoint(REPO_ROOT))
    if model is None:
        from modeling_cnn_lstm import CnnLstmConfig, CnnLstmForImageClassification, CnnLstmImageProcessor

        torch.manual_seed(seed)
        network = CnnLstmForImageClassification(CnnLstmConfig())
        network.save_pretrained(tmp / "random")
        CnnLstmImageProcessor.from_model_config(network.config).save_pretrained(tmp / "random")
        model, description = str(tmp / "random"), f"paper config, RANDOM weights (seed {seed}): no checkpoint yet"
    else:
        description = model
    app = CxrDemo.from_source(model)
    if app.classifier is None:
        raise SystemExit(app.status)
    return app, description


def time_calls(step: str, app: CxrDemo, images: list[Path], repeats: int) -> list[float]:
    method = step.removeprefix("predict + ") if step != "predict" else None

    def call(path: Path) -> None:
        app.predict(str(path))
        if method:
            app.explain(str(path), method)

    call(images[-1])  # warm-up: first-call allocations
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        call(images[index % len(images)])
        times.append(time.perf_counter() - start)
    return times


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_concurrent_users(app: CxrDemo, images: list[Path], users: int, requests: int) -> dict:
    """`users` threads, each its own gradio_client, uploading `requests` X-rays (predict, then Grad-CAM)."""
    from gradio_client import Client, handle_file

    demo = build_demo(app=app)
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}"
    latencies, errors, lock = [], [], threading.Lock()

    def user(index: int) -> None:
        try:
            client = Client(url, verbose=False)
        except Exception as error:  # noqa: BLE001 - counted, reported
            with lock:
                errors.append(f"user {index} connect: {error}")
            return
        for request in range(requests):
            path = images[(index * requests + request) % len(images)]
            start = time.perf_counter()
            try:
                label, _ = client.predict(handle_file(str(path)), api_name="/predict")
                overlay, _ = client.predict(handle_file(str(path)), GRAD_CAM, "Predicted class", api_name="/explain")
                assert label["label"] and Path(overlay).is_file()
            except Exception as error:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(f"user {index} request {request}: {type(error).__name__}: {error}")
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=user, args=(index,)) for index in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    demo.close()
    return {"users": users, "requests": users * requests, "completed": len(latencies), "errors": errors,
            "wall_s": wall, "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
            "p95_s": float(np.percentile(latencies, 95)) if latencies else None}


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchmarkAppArguments).parse_args_into_dataclasses(args=argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # gr.Warning outside a request: low-confidence notes
    import gradio  # noqa: F401 - imported before timing: predict uses it for warnings

    images = real_xrays(args.data_dir, max(args.fast_repeats, args.slow_repeats) + 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="benchmark-app-") as tmp:
        app, description = load_app(args.model, args.seed, Path(tmp))
        settings = app.classifier.explainer.settings
        print(f"model: {description}")
        print(f"saliency defaults: {settings}")
        print(f"images: {len(images)} real X-rays from {args.data_dir}")
        for threads in args.threads:
            torch.set_num_threads(threads)
            classifier = app.classifier
            if classifier.runner is not None:  # the app measures its runner at start-up, for its thread count
                classifier.runner = classifier.model.fast_cpu_inference()
                print(f"  {threads} thread(s): predictions on {classifier.runner.backend}: {classifier.runner.reason}")
            for step, target in TARGETS.items():
                repeats = args.fast_repeats if target <= 1.5 else args.slow_repeats
                times = time_calls(step, app, images, repeats)
                p50, p95 = float(np.percentile(times, 50)), float(np.percentile(times, 95))
                backend = classifier.runner.backend if classifier.runner is not None else "model"
                rows.append({"threads": threads, "step": step, "n": repeats, "p50_s": p50, "p95_s": p95,
                             "target_s": target, "meets_target": p95 <= target, "predict_backend": backend})
                print(f"  {threads} thread(s) {step:<34} p50 {p50:6.2f} s  p95 {p95:6.2f} s", flush=True)
        server = None
        if args.users > 0:
            torch.set_num_threads(max(args.threads))
            server = check_concurrent_users(app, images, args.users, args.requests_per_user)
    print()
    print("| threads | step | n | p50 (s) | p95 (s) | target (s) | p95 meets it |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['threads']} | {row['step']} | {row['n']} | {row['p50_s']:.2f} | {row['p95_s']:.2f} | "
              f"{row['target_s']:g} | {'yes' if row['meets_target'] else 'NO'} |")
    if server is not None:
        print(f"\n{server['users']} concurrent gradio_client users, {server['requests']} uploads (predict + Grad-CAM)"
              f": {server['completed']} completed, {len(server['errors'])} errors, wall {server['wall_s']:.1f} s, "
              f"per-upload p50 {server['p50_s'] or float('nan'):.2f} s, p95 {server['p95_s'] or float('nan'):.2f} s")
        for error in server["errors"][:5]:
            print("  error:", error)
    results = {"model": description, "settings": vars(settings), "rows": rows, "server": server,
               "cpu_threads_available": torch.get_num_threads()}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
