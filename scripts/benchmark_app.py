"""Latency of the app's functions on real X-rays, 8 concurrent API users against a launched server, and fairness.

    python scripts/benchmark_app.py                                   # paper-size model (checkpoint or random init)
    python scripts/benchmark_app.py --model checkpoints/cnn-lstm-cxr3 --threads 2 --slow_repeats 10
    python scripts/benchmark_app.py --fairness                        # 4 users predicting, 2 looping on IG, 60 s
    python scripts/benchmark_app.py --batch 40 --users 0              # also batch mode: loose files and one zip

Times exactly what the UI calls (`CxrDemo.predict`, `CxrDemo.explain` at the default settings), each on a different
real X-ray, after one warm-up call: predict, predict + Grad-CAM, predict + Integrated Gradients, predict + Occlusion;
p50/p95 per torch thread count. Then launches the app on 127.0.0.1 and lets `users` gradio_client users upload
concurrently (predict then Grad-CAM, like the UI), counting errors. Targets (2-core CPU): predict <= 0.5 s,
predict + Grad-CAM <= 1.5 s, IG and Occlusion <= 15 s, no errors with 8 users. `--batch N`: `CxrDemo.predict_batch`
on N real X-rays, as loose files and as one zip, against N single `CxrDemo.predict` calls (the ratio is per image).

`--fairness` instead runs `python app.py` (the shipped checkpoint by default) in its own process with its default
per-client limits, as behind the Spaces proxy (`CNN_LSTM_PROXY_HOPS=1`, each client its own X-Forwarded-For
address): `--normal_clients` users loop on /predict over the example X-rays (pausing `--think_s` between calls)
while `--heavy_clients` loop on /explain with Integrated Gradients without pause, for `--duration_s` seconds after
a `--baseline_s` phase with the normal users alone. Prints /predict p50/p95 per phase, the normal users' errors
(goal: p95 <= 2 s, none) and how many IG maps were served and how many refused by the rate limit.

`--startup` instead times `--startup_runs` cold starts of `python app.py` (the shipped checkpoint unless --model)
beside as many of the bare imports that serving needs (`import torch, gradio, transformers; from transformers
import PreTrainedModel`), alternating, in this run: seconds from process start to the first page (GET / answers 200)
and to the first /predict answer (gradio_client, a real X-ray), the server's RSS once the page answers, and its RSS
once idle after the first prediction and the background choice of the fast path; medians, with the ratios to the
floor. Goals (issue 18): first page <= 1.25x the bare imports, idle RSS <= their max RSS + 250 MB.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from cxr_app.demo import CxrDemo, build_demo, default_checkpoint, launch
from cxr_app.limits import FairUse
from cxr_app.loading import choose_fast_path
from cxr_app.saliency import GRAD_CAM, INTEGRATED_GRADIENTS, OCCLUSION

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "cxr3"
EXAMPLES_DIR = REPO_ROOT / "examples"
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
    batch: int = field(default=0, metadata={"help": "Also time batch mode on this many X-rays (0: skip)."})
    users: int = field(default=8, metadata={"help": "Concurrent gradio_client users (0: skip the server check)."})
    requests_per_user: int = field(default=2, metadata={"help": "Uploads per user (each: predict, then Grad-CAM)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights when there is no checkpoint."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the results here."})
    fairness: bool = field(default=False, metadata={"help": "Run the fairness check instead (see above)."})
    normal_clients: int = field(default=4, metadata={"help": "Fairness: users looping on /predict."})
    heavy_clients: int = field(default=2, metadata={"help": "Fairness: clients looping on /explain with IG."})
    duration_s: float = field(default=60.0, metadata={"help": "Fairness: seconds under the /explain load."})
    baseline_s: float = field(default=20.0, metadata={"help": "Fairness: seconds of normal users alone first."})
    think_s: float = field(default=1.0, metadata={"help": "Fairness: a normal user's pause between predictions."})
    gradcam_every: int = field(
        default=0, metadata={"help": "Fairness: a normal user also asks for Grad-CAM after every N-th prediction."}
    )
    rate_limits: bool = field(default=True, metadata={"help": "Fairness: keep the app's per-client limits on."})
    server_env: list[str] = field(
        default_factory=list, metadata={"help": "Fairness: extra NAME=VALUE settings for the app's process."}
    )
    heavy_file: str | None = field(
        default=None,
        metadata={"help": "Fairness: the heavy clients loop on /predict with this file (e.g. a crafted CPU-bomb "
                  "upload) instead of on /explain with Integrated Gradients."},
    )  # fmt: skip
    startup: bool = field(default=False, metadata={"help": "Run the cold-start check instead (see above)."})
    startup_runs: int = field(default=3, metadata={"help": "Startup: cold starts of each kind (median printed)."})


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

    demo = build_demo(app=app, fair_use=FairUse(proxy_hops=1))  # each user its own address, as behind a proxy
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}"
    latencies, errors, lock = [], [], threading.Lock()

    def user(index: int) -> None:
        try:
            client = Client(url, verbose=False, headers=user_headers(index))
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


def user_headers(index: int) -> dict[str, str]:
    """What the Spaces proxy adds: the user's own address (here 10.0.0.x) in X-Forwarded-For."""
    return {"X-Forwarded-For": f"10.0.{index // 250}.{index % 250 + 1}"}


def percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def app_process(model: str, env: dict[str, str], folder: Path, timeout: float = 300) -> Iterator[str]:
    """`python app.py --model MODEL` on a free port in its own process (as deployed); yields its URL."""
    port = _free_port()
    log_path = folder / "server.log"
    environment = {**os.environ, "GRADIO_TEMP_DIR": str(folder / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
                   "PYTHONUNBUFFERED": "1", **env}
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py"), "--model", model, "--port", str(port)],
                                   cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the app did not start:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/config", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        stop(process)


class FairnessCheck:
    """Normal users predicting (alone, then beside heavy clients looping on IG); latencies, errors, refusals."""

    def __init__(self, url: str, images: list[Path], args: BenchmarkAppArguments) -> None:
        self.url, self.images, self.args = url, images, args
        self.lock, self.stop_heavy, self.stop_all = threading.Lock(), threading.Event(), threading.Event()
        self.phase = "baseline"
        self.predict_times: dict[str, list[float]] = {"baseline": [], "under load": []}
        self.gradcam_times: dict[str, list[float]] = {"baseline": [], "under load": []}
        self.normal_errors: list[str] = []
        self.heavy = {"served": 0, "rate_limited": 0, "refused_in_queue": 0, "other_errors": [], "seconds": []}

    def _timed(self, call, times: dict[str, list[float]], label: str) -> None:
        """Run one request; its latency goes to the current phase, a failure to the normal users' errors."""
        name, start = self.phase, time.perf_counter()
        try:
            call()
        except Exception as error:  # noqa: BLE001 - counted, reported
            with self.lock:
                self.normal_errors.append(f"{label}: {type(error).__name__}: {error}")
        else:
            with self.lock:
                times[name].append(time.perf_counter() - start)

    def normal_client(self, index: int) -> None:
        from gradio_client import Client, handle_file

        client = Client(self.url, verbose=False, headers=user_headers(index))
        request = 0
        while not self.stop_all.is_set():
            path = handle_file(str(self.images[(index + request) % len(self.images)]))
            request += 1

            def predict(path=path) -> None:
                label, _ = client.predict(path, api_name="/predict")
                assert label["label"]

            self._timed(predict, self.predict_times, f"user {index}")
            if self.args.gradcam_every and request % self.args.gradcam_every == 0 and not self.stop_all.is_set():
                self._timed(lambda path=path: client.predict(path, GRAD_CAM, "Predicted class", api_name="/explain"),
                            self.gradcam_times, f"user {index} Grad-CAM")
            self.stop_all.wait(self.args.think_s)

    def _count_heavy_failure(self, error: Exception) -> None:
        from gradio_client.exceptions import AppError

        text = str(error)
        with self.lock:
            if isinstance(error, AppError) and ("Try again" in text or "at a time" in text):
                self.heavy["rate_limited"] += 1
            elif not isinstance(error, AppError) and "Queue is full" in text:
                self.heavy["refused_in_queue"] += 1
            elif self.args.heavy_file and isinstance(error, AppError):  # the file itself refused, with its sentence
                self.heavy["refused_file"] = self.heavy.get("refused_file", 0) + 1
                self.heavy["file_sentence"] = text[:200]
            else:
                prefix = "" if isinstance(error, AppError) else f"{type(error).__name__}: "
                self.heavy["other_errors"].append(prefix + text[:200])

    def heavy_client(self, index: int) -> None:
        from gradio_client import Client, handle_file

        client = Client(self.url, verbose=False, headers=user_headers(100 + index))
        bomb = self.args.heavy_file
        path = handle_file(bomb or str(self.images[index % len(self.images)]))
        while not self.stop_heavy.is_set():
            start = time.perf_counter()
            try:
                if bomb:
                    client.predict(path, api_name="/predict")
                else:
                    client.predict(path, INTEGRATED_GRADIENTS, "Predicted class", api_name="/explain")
            except Exception as error:  # noqa: BLE001 - rate limits, queue refusals and the rest, counted
                self._count_heavy_failure(error)
                self.stop_heavy.wait(0.2)  # a refusal is cheap; a hostile script would not wait long either
            else:
                with self.lock:
                    self.heavy["served"] += 1
                    self.heavy["seconds"].append(time.perf_counter() - start)

    def run(self) -> dict:
        normals = [threading.Thread(target=self.normal_client, args=(i,)) for i in range(self.args.normal_clients)]
        heavies = [threading.Thread(target=self.heavy_client, args=(i,)) for i in range(self.args.heavy_clients)]
        for thread in normals:
            thread.start()
        time.sleep(self.args.baseline_s)
        self.phase = "under load"
        for thread in heavies:
            thread.start()
        time.sleep(self.args.duration_s)
        self.stop_heavy.set()
        self.stop_all.set()
        for thread in normals + heavies:
            thread.join()
        return self.summary()

    def summary(self) -> dict:
        args = self.args
        phases, gradcam = {}, {}
        for rows, measured in ((phases, self.predict_times), (gradcam, self.gradcam_times)):
            for name, times in measured.items():
                p50, p95 = percentiles(times)
                rows[name] = {"n": len(times), "p50_s": p50, "p95_s": p95, "max_s": max(times) if times else None}
        under = phases["under load"]
        return {
            "normal_clients": args.normal_clients,
            "heavy_clients": args.heavy_clients,
            "duration_s": args.duration_s,
            "baseline_s": args.baseline_s,
            "think_s": args.think_s,
            "rate_limits": args.rate_limits,
            "predict": phases,
            "gradcam": gradcam if args.gradcam_every else None,
            "normal_errors": self.normal_errors,
            "heavy": {**self.heavy, "seconds": [round(value, 2) for value in self.heavy["seconds"]]},
            "meets_goal": under["p95_s"] is not None and under["p95_s"] <= 2.0 and not self.normal_errors,
        }


def check_fairness(url: str, images: list[Path], args: BenchmarkAppArguments) -> dict:
    return FairnessCheck(url, images, args).run()


def run_fairness(args: BenchmarkAppArguments) -> dict:
    model = args.model or str(default_checkpoint(REPO_ROOT))
    if not Path(model).is_dir() and "/" not in model:
        raise SystemExit(f"no checkpoint at {model}; pass --model")
    images = sorted(path for path in EXAMPLES_DIR.glob("*.jpg"))
    env = {"CNN_LSTM_PROXY_HOPS": "1", "CNN_LSTM_RATE_LIMITS": "on" if args.rate_limits else "off"}
    env.update(dict(setting.split("=", 1) for setting in args.server_env))
    print(f"model: {model}; {len(images)} example X-rays; server settings {env}")
    heavy = f"/predict with {args.heavy_file}" if args.heavy_file else f"/explain ({INTEGRATED_GRADIENTS})"
    print(f"{args.normal_clients} users on /predict (pause {args.think_s:g} s), {args.baseline_s:g} s alone, then "
          f"{args.duration_s:g} s beside {args.heavy_clients} clients looping on {heavy}")
    with tempfile.TemporaryDirectory(prefix="benchmark-fairness-") as tmp, app_process(model, env, Path(tmp)) as url:
        result = check_fairness(url, images, args)
    result.update(model=model, server_env=env, cpu_count=os.cpu_count())
    print("\n| phase | call | n | p50 (s) | p95 (s) | max (s) |")
    print("|---|---|---|---|---|---|")
    for call, rows in (("/predict", result["predict"]), (f"/explain {GRAD_CAM}", result["gradcam"] or {})):
        for name, row in rows.items():
            cells = [f"{row[key]:.2f}" if row[key] is not None else "-" for key in ("p50_s", "p95_s", "max_s")]
            print(f"| {name} | {call} | {row['n']} | {' | '.join(cells)} |")
    heavy = result["heavy"]
    print(f"\nnormal users' errors: {len(result['normal_errors'])}; IG maps served: {heavy['served']} "
          f"(each {', '.join(f'{s:.1f}' for s in heavy['seconds'])} s), refused by the rate limit: "
          f"{heavy['rate_limited']}, refused at the queue: {heavy['refused_in_queue']}, "
          f"the file refused: {heavy.get('refused_file', 0)}, other errors: {len(heavy['other_errors'])}")
    for error in (result["normal_errors"] + heavy["other_errors"])[:5]:
        print("  error:", error)
    print(f"goal (/predict p95 <= 2 s under load, no errors for normal users): "
          f"{'met' if result['meets_goal'] else 'MISSED'}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


def time_batch(app: CxrDemo, images: list[Path], tmp: Path) -> dict:
    """Seconds per image: N single predictions, one batch of the N files, one batch of a zip of them."""
    import zipfile

    archive = tmp / "batch.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for index, path in enumerate(images):
            zipped.write(path, f"{index:03d}-{path.name}")
    app.predict(str(images[0]))  # warm-up
    start = time.perf_counter()
    for path in images:
        app.predict(str(path))
    single = (time.perf_counter() - start) / len(images)
    timings = {"images": len(images), "single_s_per_image": single}
    for name, uploads in (("files", [str(path) for path in images]), ("zip", [str(archive)])):
        start = time.perf_counter()
        rows = app.predict_batch(uploads)
        elapsed = time.perf_counter() - start
        assert len(rows) == len(images) and all(row["predicted"] for row in rows), rows[:3]
        timings[f"batch_{name}_s_per_image"] = elapsed / len(images)
        timings[f"batch_{name}_total_s"] = elapsed
    return timings


BARE_IMPORTS = "import torch, gradio, transformers; from transformers import PreTrainedModel"
FAST_PATH_CHOSEN = re.compile(r"Occlusion (now )?runs on")  # logged once the fast path is chosen (before: at start-up)


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} for {pid}")


def bare_import_start(env: dict[str, str]) -> dict:
    """Seconds until a fresh interpreter has done only the imports that serving needs (it prints a line then; its
    exit, which tears torch down, is not counted), and its max RSS (MB)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", BARE_IMPORTS + "; print('imported', flush=True)"], env=env,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    line = process.stdout.readline()
    seconds = time.perf_counter() - start
    process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 or line.strip() != "imported":
        raise SystemExit(f"the bare imports failed ({process.returncode})")
    return {"seconds": seconds, "max_rss_mb": usage.ru_maxrss / 1024}


def app_cold_start(model: str | None, env: dict[str, str], folder: Path, xray: Path) -> dict:
    """One cold start of `python app.py`: first page, first prediction, RSS at the page and once idle."""
    from gradio_client import Client, handle_file

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = folder / f"server-{port}.log"
    command = [sys.executable, str(REPO_ROOT / "app.py"), "--port", str(port), *(["--model", model] if model else [])]
    with log_path.open("w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env={**env, "GRADIO_TEMP_DIR": str(folder / "gradio")},
                                   stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        while True:
            if process.poll() is not None or time.perf_counter() - start > 300:
                raise SystemExit(f"the app did not start:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        first_page = time.perf_counter() - start
        rss_page = rss_mb(process.pid)
        Client(url, verbose=False).predict(handle_file(str(xray)), api_name="/predict")
        first_prediction = time.perf_counter() - start
        deadline = time.perf_counter() + 120
        while not FAST_PATH_CHOSEN.search(log_path.read_text()) and time.perf_counter() < deadline:
            time.sleep(0.5)
        time.sleep(2.0)  # idle
        return {"first_page_s": first_page, "first_prediction_s": first_prediction, "rss_page_mb": rss_page,
                "rss_idle_mb": rss_mb(process.pid), "hwm_mb": rss_mb(process.pid, "VmHWM"),
                "fast_path_chosen": bool(FAST_PATH_CHOSEN.search(log_path.read_text()))}  # fmt: skip
    finally:
        stop(process)


def run_startup(args: BenchmarkAppArguments) -> dict:
    import statistics

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    xray = sorted((REPO_ROOT / "examples").glob("normal-*.jpg"))[0]
    bare, app = [], []
    with tempfile.TemporaryDirectory(prefix="benchmark-startup-") as tmp:
        for run in range(args.startup_runs):  # alternating, so a busy moment hits both alike
            bare.append(bare_import_start(env))
            app.append(app_cold_start(args.model, env, Path(tmp), xray))
            last_bare, last = bare[-1], app[-1]
            print(f"run {run + 1}: bare imports {last_bare['seconds']:.2f} s, {last_bare['max_rss_mb']:.0f} MB; "
                  f"app: first page {last['first_page_s']:.2f} s, first prediction {last['first_prediction_s']:.2f} "
                  f"s, RSS {last['rss_page_mb']:.0f} MB at the page, {last['rss_idle_mb']:.0f} MB idle",
                  flush=True)  # fmt: skip
    median = {key: statistics.median(run[key] for run in app) for key in app[0] if key != "fast_path_chosen"}
    floor_s = statistics.median(run["seconds"] for run in bare)
    floor_mb = statistics.median(run["max_rss_mb"] for run in bare)
    result = {"bare_imports_s": floor_s, "bare_imports_max_rss_mb": floor_mb, **median,
              "first_page_ratio": median["first_page_s"] / floor_s,
              "first_prediction_ratio": median["first_prediction_s"] / floor_s,
              "idle_rss_over_floor_mb": median["rss_idle_mb"] - floor_mb,
              "runs": {"bare": bare, "app": app}}  # fmt: skip
    print(f"\nmedian of {args.startup_runs} cold starts each (model: {args.model or 'the shipped checkpoint'})")
    print("| | seconds | ratio to the bare imports | RSS (MB) |\n|---|---|---|---|")
    print(f"| bare imports (the floor) | {floor_s:.2f} | 1.00 | {floor_mb:.0f} (max) |")
    print(f"| app: first page | {median['first_page_s']:.2f} | {result['first_page_ratio']:.2f} | "
          f"{median['rss_page_mb']:.0f} |")  # fmt: skip
    print(f"| app: first /predict | {median['first_prediction_s']:.2f} | {result['first_prediction_ratio']:.2f} | |")
    print(f"| app: idle after it (fast path chosen) | | | {median['rss_idle_mb']:.0f} "
          f"(floor + {result['idle_rss_over_floor_mb']:.0f}; peak {median['hwm_mb']:.0f}) |")  # fmt: skip
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchmarkAppArguments).parse_args_into_dataclasses(args=argv)
    if args.fairness:
        return run_fairness(args)
    if args.startup:
        return run_startup(args)
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
            if classifier.model.device.type == "cpu":  # as the served app does after start-up, for this thread count
                choose_fast_path(classifier)
                print(f"  {threads} thread(s): Occlusion on {classifier.runner.backend}: {classifier.runner.reason}")
            for step, target in TARGETS.items():
                repeats = args.fast_repeats if target <= 1.5 else args.slow_repeats
                times = time_calls(step, app, images, repeats)
                p50, p95 = float(np.percentile(times, 50)), float(np.percentile(times, 95))
                backend = classifier.runner.backend if classifier.runner is not None else "model"
                rows.append({"threads": threads, "step": step, "n": repeats, "p50_s": p50, "p95_s": p95,
                             "target_s": target, "meets_target": p95 <= target, "predict_backend": backend})
                print(f"  {threads} thread(s) {step:<34} p50 {p50:6.2f} s  p95 {p95:6.2f} s", flush=True)
        batch = None
        if args.batch > 0:
            torch.set_num_threads(max(args.threads))
            batch = time_batch(app, real_xrays(args.data_dir, args.batch), Path(tmp))
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
    if batch is not None:
        single = batch["single_s_per_image"]
        print(f"\nbatch of {batch['images']} X-rays, {max(args.threads)} thread(s), seconds per image: single "
              f"predict {single:.3f}; batch of files {batch['batch_files_s_per_image']:.3f} "
              f"({single / batch['batch_files_s_per_image']:.2f}x), one zip {batch['batch_zip_s_per_image']:.3f} "
              f"({single / batch['batch_zip_s_per_image']:.2f}x); whole batch {batch['batch_files_total_s']:.1f} s "
              f"(files), {batch['batch_zip_total_s']:.1f} s (zip)")
    if server is not None:
        print(f"\n{server['users']} concurrent gradio_client users, {server['requests']} uploads (predict + Grad-CAM)"
              f": {server['completed']} completed, {len(server['errors'])} errors, wall {server['wall_s']:.1f} s, "
              f"per-upload p50 {server['p50_s'] or float('nan'):.2f} s, p95 {server['p95_s'] or float('nan'):.2f} s")
        for error in server["errors"][:5]:
            print("  error:", error)
    results = {"model": description, "settings": vars(settings), "rows": rows, "server": server, "batch": batch,
               "cpu_threads_available": torch.get_num_threads()}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
