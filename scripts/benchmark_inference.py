"""CPU inference latency of the paper model: fp32 eager PyTorch side by side with faster paths, in one run.

    python scripts/benchmark_inference.py                      # paper config, seeded random weights
    python scripts/benchmark_inference.py --model checkpoints/cnn-lstm-cxr3 --threads 1 2 --repeats 20

Per-image latency (batch of one, p50/p95 over repeats) for each path and thread count, then each path's
predictions on a fixed batch of real X-rays compared with fp32 eager (top-1 agreement, max probability difference).
The `model_*` paths are the model's own no-grad CPU forward with `cpu_inference_backend` set to bf16 / onnxruntime:
exactly what `pipeline` and the app run (`auto` picks bf16 on CPUs with native bfloat16, else onnxruntime).
"""

from __future__ import annotations

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

PATHS = ("eager_fp32", "channels_last_fp32", "autocast_bf16", "model_bf16", "model_onnxruntime", "compiled_fp32")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr3"


@dataclass
class BenchmarkArguments:
    model: str | None = field(default=None, metadata={"help": "Checkpoint folder or Hub id; default: paper config."})
    data_dir: str = field(default=str(DEFAULT_DATA_DIR), metadata={"help": "Folder in the cxr3 layout."})
    num_images: int = field(default=9, metadata={"help": "Real X-rays in the fixed comparison batch."})
    repeats: int = field(default=10, metadata={"help": "Timed single-image forwards per path and thread count."})
    threads: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "torch/ORT thread counts."})
    paths: list[str] = field(
        default_factory=lambda: [name for name in PATHS if name != "compiled_fp32"],
        metadata={"help": f"Paths to time, from {PATHS} (compiled_fp32 compiles for minutes)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random weights when no --model is given."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the results here."})


def load_model(model_id: str | None, seed: int) -> tuple[CnnLstmForImageClassification, CnnLstmImageProcessor, str]:
    if model_id is None:
        torch.manual_seed(seed)
        config = CnnLstmConfig()
        return CnnLstmForImageClassification(config).eval(), CnnLstmImageProcessor.from_model_config(config), (
            f"paper config, random weights (seed {seed})"
        )
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_id, trust_remote_code=True).eval()
    return model, AutoImageProcessor.from_pretrained(model_id, trust_remote_code=True), model_id


def real_images(data_dir: str, count: int) -> list[Image.Image]:
    """The first images of each label folder in turn: a fixed, class-balanced batch."""
    folders = sorted(path for path in (Path(data_dir) / "images").iterdir() if path.is_dir())
    per_label = [sorted(folder.glob("*.jpg")) for folder in folders]
    chosen = [paths[index] for index in range(count) for paths in per_label if index < len(paths)][:count]
    if len(chosen) < count:
        raise SystemExit(f"error: found {len(chosen)} images under {data_dir}/images, need {count}")
    return [Image.open(path).copy() for path in chosen]


Runner = tuple[Callable[[], None], Callable[[torch.Tensor], torch.Tensor]]


def make_runner(name: str, model: CnnLstmForImageClassification) -> Runner:
    """One inference path: `prepare()` sets the model up (outside the timed region), `run(pixels)` -> fp32 logits."""
    backend = name.removeprefix("model_") if name.startswith("model_") else "torch"
    channels_last = name == "channels_last_fp32"
    use_bf16 = name == "autocast_bf16"
    forward = torch.compile(model.forward) if name == "compiled_fp32" else model.forward

    def prepare() -> None:
        model.config.cpu_inference_backend = backend
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def run(pixels: torch.Tensor) -> torch.Tensor:
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            return forward(pixel_values=pixels).logits.float()

    return prepare, run


def time_path(runner: Runner, images: torch.Tensor, repeats: int) -> list[float]:
    prepare, run = runner
    prepare()
    run(images[:1])  # warm-up: ONNX export / session, oneDNN primitive caches, compilation
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


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    unknown = sorted(set(args.paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"error: unknown path(s) {unknown}; choose from {PATHS}")
    model, processor, description = load_model(args.model, args.seed)
    pixels = processor(real_images(args.data_dir, args.num_images))["pixel_values"]
    print(f"model: {description}; {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"torch {torch.__version__}; {args.num_images} real X-rays from {args.data_dir}; {args.repeats} repeats")

    names = ["eager_fp32"] + [name for name in args.paths if name != "eager_fp32"]  # the baseline comes first
    runners = {name: make_runner(name, model) for name in names}
    prepare_eager, run_eager = runners["eager_fp32"]
    prepare_eager()
    reference_probabilities = run_eager(pixels).softmax(-1)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        baseline = 0.0
        for name, runner in runners.items():
            seconds = time_path(runner, pixels, args.repeats)
            p50 = statistics.median(seconds)
            if name == "eager_fp32":
                baseline = p50
            probabilities = runner[1](pixels).softmax(-1)  # still prepared by time_path
            rows.append(
                {
                    "path": name,
                    "threads": threads,
                    "p50_s": p50,
                    "p95_s": percentile(seconds, 0.95),
                    "speedup_vs_eager": baseline / p50,
                    "top1_agreement": int((probabilities.argmax(-1) == reference_probabilities.argmax(-1)).sum()),
                    "max_probability_difference": float((probabilities - reference_probabilities).abs().max()),
                }
            )
    model.to(memory_format=torch.contiguous_format)
    model.config.cpu_inference_backend = "auto"

    print("\n| path | threads | p50 (s) | p95 (s) | speed-up vs eager fp32 | same top-1 | max prob. diff |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        speedup = f"{row['speedup_vs_eager']:.2f}x"
        print(
            f"| {row['path']} | {row['threads']} | {row['p50_s']:.3f} | {row['p95_s']:.3f} | {speedup} "
            f"| {row['top1_agreement']}/{args.num_images} | {row['max_probability_difference']:.2e} |"
        )
    result = {"model": description, "torch": torch.__version__, "num_images": args.num_images, "rows": rows}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
