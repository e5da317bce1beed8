"""CPU inference latency of the CNN-LSTM: eager fp32 PyTorch side by side with the faster paths, in one run.

    python scripts/benchmark_inference.py                      # paper config, seeded random weights
    python scripts/benchmark_inference.py --model checkpoints/cnn-lstm-cxr3 --threads 1 2 --repeats 20

Per-image latency (batch of one, p50/p95 over repeats) for each path and thread count, then each path's predictions
on a fixed batch of real X-rays (default: the six in examples/) compared with eager fp32 (top-1 agreement, max
probability difference). Paths: `eager_fp32` (what `forward` runs), `channels_last_fp32` and `autocast_bf16` (plain
PyTorch variants; on CPUs without avx512_bf16/amx_bf16 bf16 is emulated: autocast is skipped there unless
`--emulated_bf16`, having measured 26 s/img, 65x eager, for the paper model), then the opt-in runners of
`model.fast_cpu_inference(backend)`: `runner_torch`, `runner_channels_last`, `runner_onnxruntime`, `runner_bf16` and
`runner_auto`, whose choice, reason and speed against eager fp32 are printed at the end. Runners are built after the
thread count is set (ONNX Runtime's thread count is fixed when its session is made); "build" is that time (export,
checks and, for auto, the timed trial). The model's own checkpoint code is not run: this repository's classes load it.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import HfArgumentParser

from modeling_cnn_lstm import CnnLstmConfig, CnnLstmForImageClassification, CnnLstmImageProcessor
from modeling_cnn_lstm.fast_inference_cnn_lstm import (
    EMULATED_BF16,
    CnnLstmFastInference,
    clear_decisions,
    cpu_has_native_bf16,
)
from train.training.checkpoint_loading import NotACnnLstmCheckpoint, load_model_and_processor

RUNNERS = ("runner_torch", "runner_channels_last", "runner_onnxruntime", "runner_bf16", "runner_auto")
PATHS = ("eager_fp32", "channels_last_fp32", "autocast_bf16", *RUNNERS, "compiled_fp32")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "examples"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class BenchmarkArguments:
    model: str | None = field(default=None, metadata={"help": "Checkpoint folder or Hub id; default: paper config."})
    data_dir: str = field(default=str(DEFAULT_DATA_DIR), metadata={"help": "Folder of X-rays (searched recursively)."})
    num_images: int = field(default=6, metadata={"help": "Real X-rays in the fixed comparison batch."})
    repeats: int = field(default=10, metadata={"help": "Timed single-image forwards per path and thread count."})
    threads: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "torch/ORT thread counts."})
    paths: list[str] = field(
        default_factory=lambda: [name for name in PATHS if name != "compiled_fp32"],
        metadata={"help": f"Paths to time, from {PATHS} (compiled_fp32 compiles for minutes)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random weights when no --model is given."})
    emulated_bf16: bool = field(
        default=False, metadata={"help": "Time autocast_bf16 where bf16 is emulated too (minutes: paper model)."}
    )
    output_json: str | None = field(default=None, metadata={"help": "Also write the results here."})


def load_model(model_id: str | None, seed: int) -> tuple[CnnLstmForImageClassification, CnnLstmImageProcessor, str]:
    if model_id is None:
        torch.manual_seed(seed)
        config = CnnLstmConfig()
        return CnnLstmForImageClassification(config).eval(), CnnLstmImageProcessor.from_model_config(config), (
            f"paper config, random weights (seed {seed})"
        )
    try:
        model, processor = load_model_and_processor(model_id)  # this repository's classes, after a model_type check
    except NotACnnLstmCheckpoint as error:
        raise SystemExit(f"error: --model {error}") from None
    return model, processor, model_id


def real_images(data_dir: str, count: int) -> list[Image.Image]:
    """`count` images spread evenly over the sorted files under `data_dir`: the same batch on every run."""
    paths = sorted(path for path in Path(data_dir).rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < count:
        raise SystemExit(f"error: found {len(paths)} images under {data_dir}, need {count}")
    chosen = [paths[index * len(paths) // count] for index in range(count)]
    return [Image.open(path).copy() for path in chosen]


Run = Callable[[torch.Tensor], torch.Tensor]


def eager_run(model: torch.nn.Module, channels_last: bool = False, bf16: bool = False) -> Run:
    def run(pixels: torch.Tensor) -> torch.Tensor:
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(pixel_values=pixels).logits.float()

    return run


def build_path(name: str, model: CnnLstmForImageClassification) -> tuple[Run, str, CnnLstmFastInference | None]:
    """One inference path -> (run(pixels) -> fp32 logits, a note, the opt-in runner if it is one). Built outside the
    timed region."""
    emulated = "" if cpu_has_native_bf16() else "emulated bf16"
    if name == "eager_fp32":
        return eager_run(model), "", None
    if name == "channels_last_fp32":
        return eager_run(copy.deepcopy(model).to(memory_format=torch.channels_last), channels_last=True), "", None
    if name == "autocast_bf16":
        return eager_run(model, bf16=True), emulated, None
    if name == "compiled_fp32":
        return eager_run(torch.compile(model)), "", None
    backend = name.removeprefix("runner_")
    if backend == "auto":
        clear_decisions()  # a fresh trial for this thread count, as a new app process would run
    runner = model.fast_cpu_inference(backend)
    if backend == "auto":
        note = f"chose {runner.backend}"
    elif runner.backend != backend:
        note = f"fell back to {runner.backend}: {runner.rejected.get(backend, runner.reason)}"
    else:
        note = emulated if backend == "bf16" else ""
    return runner, note, runner


def time_path(run: Run, images: torch.Tensor, repeats: int) -> list[float]:
    run(images[:1])  # warm-up: oneDNN primitive caches, ORT arenas, compilation
    run(images[:1])
    seconds = []
    for index in range(repeats):
        single = images[index % len(images)][None]
        start = time.perf_counter()
        run(single)
        seconds.append(time.perf_counter() - start)
    return seconds


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(names: list[str], model, pixels: torch.Tensor, threads: int, repeats: int) -> tuple[list, list]:
    """Time every path at one thread count against eager fp32 (the first name); rows and the auto choices."""
    torch.set_num_threads(threads)
    rows, autos, reference, baseline = [], [], None, 0.0
    for name in names:
        start = time.perf_counter()
        run, note, runner = build_path(name, model)
        build_s = time.perf_counter() - start
        seconds = time_path(run, pixels, repeats)
        p50 = statistics.median(seconds)
        probabilities = run(pixels).softmax(-1)
        if name == "eager_fp32":
            baseline, reference = p50, probabilities
        rows.append(
            {
                "path": name,
                "threads": threads,
                "build_s": build_s,
                "p50_s": p50,
                "p95_s": percentile(seconds, 0.95),
                "speedup_vs_eager": baseline / p50,
                "top1_agreement": int((probabilities.argmax(-1) == reference.argmax(-1)).sum()),
                "max_probability_difference": float((probabilities - reference).abs().max()),
                "note": note,
            }
        )
        if name == "runner_auto":
            autos.append({"threads": threads, "backend": runner.backend, "reason": runner.reason,
                          "trial_p50_s": runner.timings, "rejected": runner.rejected,
                          "speedup_vs_eager": baseline / p50})
        del run, runner  # free copies and sessions before the next path
    return rows, autos


def print_results(rows: list[dict], autos: list[dict], skipped: dict[str, str], num_images: int) -> None:
    print("\n| path | threads | build (s) | p50 (ms) | p95 (ms) | speed-up vs eager fp32 | same top-1 "
          "| max prob. diff | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['path']} | {row['threads']} | {row['build_s']:.2f} | {1000 * row['p50_s']:.2f} "
            f"| {1000 * row['p95_s']:.2f} "
            f"| {row['speedup_vs_eager']:.2f}x | {row['top1_agreement']}/{num_images} "
            f"| {row['max_probability_difference']:.2e} | {row['note']} |"
        )
    for name, why in skipped.items():
        print(f"| {name} | - | - | - | - | - | - | - | skipped: {why} |")
    for auto in autos:
        print(f"\nauto, {auto['threads']} thread(s): chose {auto['backend']} ({auto['speedup_vs_eager']:.2f}x eager "
              f"fp32's speed in the timed rows above). Why: {auto['reason']}")
        for name, why in auto["rejected"].items():
            print(f"  skipped {name}: {why}")


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    unknown = sorted(set(args.paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"error: unknown path(s) {unknown}; choose from {PATHS}")
    model, processor, description = load_model(args.model, args.seed)
    pixels = processor(real_images(args.data_dir, args.num_images), return_tensors="pt")["pixel_values"]
    print(f"model: {description}; {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"torch {torch.__version__}; {args.num_images} real X-rays from {args.data_dir}; {args.repeats} repeats")
    if not cpu_has_native_bf16():
        print(f"bf16: {EMULATED_BF16}")

    names = ["eager_fp32"] + [name for name in args.paths if name != "eager_fp32"]  # the baseline comes first
    skipped = {}
    if "autocast_bf16" in names and not cpu_has_native_bf16() and not args.emulated_bf16:
        names.remove("autocast_bf16")
        skipped["autocast_bf16"] = "emulated bf16 (26 s/img, 65x eager, measured for the paper model): --emulated_bf16"
    rows, autos = [], []
    for threads in args.threads:
        thread_rows, thread_autos = measure(names, model, pixels, threads, args.repeats)
        rows += thread_rows
        autos += thread_autos
    print_results(rows, autos, skipped, args.num_images)
    result = {"model": description, "torch": torch.__version__, "num_images": args.num_images, "rows": rows,
              "auto": autos, "skipped": skipped}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
