"""Training throughput: the project's Trainer path against a plain PyTorch loop, same model, batch and precision.

    python scripts/benchmark_train.py --model_config paper --batch_size 256 --bf16 --channels_last --torch_compile \
        --num_workers 8 --steps 50 --warmup_steps 15        # on a GPU
    python scripts/benchmark_train.py --model_config train/configs/tiny.json --batch_size 8 --steps 4   # CPU check
    python scripts/benchmark_train.py --cpu_matrix --device cpu --batch_size 16 --image_size 224 --steps 4 \
        --warmup_steps 1 --threads 2                                            # CPU settings side by side

With `--cpu_matrix`, the plain loop runs once per CPU setting (`--settings`: eager fp32, channels_last, bf16
autocast, torch.compile, combinations) and thread count (`--threads`), and each is reported as images/s and as a
ratio against eager fp32 at the same thread count; the line `precision auto -> ...` says what train/run.py's
`--cpu_precision auto` picks on this CPU and why (CPU flags, never oneDNN's "bf16 supported", which is also true
where bf16 is only emulated).

Both paths use the same input pipeline (in-memory uint8 images, one-gather batches, `DeviceBatchTransform` on the
device with the paper's rotation), the same optimizer (RMSprop, as in train/configs/paper.json), no gradient
clipping, and the same autocast/channels_last/torch.compile settings. Synthetic images (content does not change the
speed of a dense CNN). Timing starts after `warmup_steps` (compilation, cuDNN autotuning, worker start-up) and is
bracketed by device synchronisations. Prints both images/s and the ratio, then one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments, set_seed

from cxr_common.atomic import atomic_write_text
from modeling_cnn_lstm import CnnLstmConfig, CnnLstmForImageClassification
from train.training.arguments import ModelArguments
from train.training.hardware import choose_cpu_precision, cpu_model_name
from train.training.input_pipeline import CachedSplit, UInt8ImageDataset, collate_uint8
from train.training.trainer import batch_transform_for, make_trainer


@dataclass
class BenchmarkArguments:
    model_config: str = field(default="paper", metadata={"help": "'paper' or a train/configs/*.json file."})
    use_batch_norm: bool = field(default=True, metadata={"help": "Batch norm (as train/configs/paper.json)."})
    batch_size: int = field(default=256, metadata={"help": "Images per step."})
    steps: int = field(default=50, metadata={"help": "Timed optimizer steps per path."})
    warmup_steps: int = field(default=10, metadata={"help": "Untimed steps first (compile, autotune, workers)."})
    num_images: int = field(default=2560, metadata={"help": "Synthetic in-memory images."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast."})
    channels_last: bool = field(default=False, metadata={"help": "channels_last weights and inputs."})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model (both paths)."})
    tf32: bool = field(default=True, metadata={"help": "TF32 matmuls/convolutions on CUDA (both paths)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers (both paths)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "RMSprop learning rate."})
    rotation_degrees: float = field(default=15.0, metadata={"help": "Augmentation on the device (both paths)."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cuda or cpu."})
    order: str = field(default="plain,trainer", metadata={"help": "Which path runs first."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the summary to this JSON file."})
    image_size: int | None = field(default=None, metadata={"help": "Override the config's input size."})
    cpu_matrix: bool = field(default=False, metadata={"help": "Compare CPU settings (plain loop) side by side."})
    settings: str = field(
        default="fp32,channels_last,bf16,bf16+channels_last,compile,compile+channels_last",
        metadata={"help": "With --cpu_matrix: settings, '+'-combined from fp32, channels_last, bf16, compile."},
    )
    threads: str = field(default="2", metadata={"help": "With --cpu_matrix: comma-separated torch thread counts."})


def model_config(args: BenchmarkArguments) -> CnnLstmConfig:
    size = {} if args.image_size is None else {"image_size": args.image_size}
    if args.model_config == "paper":
        return CnnLstmConfig(use_batch_norm=args.use_batch_norm, **size)
    settings = json.loads(Path(args.model_config).read_text())
    model_fields = set(ModelArguments.__dataclass_fields__)
    model_args = ModelArguments(**{key: value for key, value in settings.items() if key in model_fields})
    return model_args.build_config(**size)


def synthetic_split(config: CnnLstmConfig, count: int, seed: int) -> CachedSplit:
    """Grayscale uint8 images stored with one channel, as the training cache stores radiographs."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (count, 1, config.image_size, config.image_size), dtype=np.uint8)
    return CachedSplit(pixels, rng.integers(0, config.num_labels, count).astype(np.int64))


def new_model(config: CnnLstmConfig, args: BenchmarkArguments, device: torch.device) -> CnnLstmForImageClassification:
    set_seed(args.seed)
    model = CnnLstmForImageClassification(config).to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(config: CnnLstmConfig, split: CachedSplit, args: BenchmarkArguments, device: torch.device) -> float:
    """The reference: DataLoader -> device -> transform -> autocast forward -> backward -> RMSprop step."""
    model = new_model(config, args, device).train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=args.learning_rate, alpha=0.9, eps=1e-7)
    forward = torch.compile(model) if args.torch_compile else model
    transform = batch_transform_for(config, args.rotation_degrees, args.channels_last)
    loader = torch.utils.data.DataLoader(
        UInt8ImageDataset(split.pixels, split.labels),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.num_workers > 0,
        collate_fn=collate_uint8,
    )
    total, step, started = args.warmup_steps + args.steps, 0, None
    while step < total:
        for batch in loader:
            if step == args.warmup_steps:
                synchronize(device)
                started = time.perf_counter()
            pixel_values = transform(batch["pixel_values"].to(device, non_blocking=True), train=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = forward(pixel_values=pixel_values, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == total:
                break
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - started)


class _StepTimer(TrainerCallback):
    """Wall time between the end of the warm-up step and the end of the last step, device synchronised."""

    def __init__(self, warmup_steps: int, device: torch.device) -> None:
        self.warmup_steps, self.device = warmup_steps, device
        self.started = self.stopped = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps:
            synchronize(self.device)
            self.started = time.perf_counter()
        if state.global_step == state.max_steps:
            synchronize(self.device)
            self.stopped = time.perf_counter()


def trainer_path(config: CnnLstmConfig, split: CachedSplit, args: BenchmarkArguments, device: torch.device) -> float:
    """`CxrTrainer` exactly as train/run.py builds it, with the settings of train/configs/paper.json."""
    model = new_model(config, args, device)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.warmup_steps + args.steps,
            learning_rate=args.learning_rate,
            optim="rmsprop",
            optim_args="alpha=0.9,eps=1e-7",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            logging_nan_inf_filter=False,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            bf16=args.bf16,
            torch_compile=args.torch_compile,
            dataloader_num_workers=args.num_workers,
            dataloader_pin_memory=device.type == "cuda",
            dataloader_persistent_workers=args.num_workers > 0,
            dataloader_drop_last=True,
            accelerator_config={"non_blocking": device.type == "cuda"},
            use_cpu=device.type == "cpu",
            remove_unused_columns=False,
            report_to="none",
            disable_tqdm=True,
            seed=args.seed,
        )
        transform = batch_transform_for(config, args.rotation_degrees, args.channels_last)
        timer = _StepTimer(args.warmup_steps, device)
        trainer = make_trainer(model, training_args, split, None, transform, callbacks=[timer])
        trainer.train()
        compiled = isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    if compiled != args.torch_compile:
        raise RuntimeError(
            f"the Trainer's model is {'' if compiled else 'not '}compiled, --torch_compile {args.torch_compile}"
        )
    return args.steps * args.batch_size / (timer.stopped - timer.started)


SETTING_PARTS = {"fp32": {}, "channels_last": {"channels_last": True}, "bf16": {"bf16": True},
                 "compile": {"torch_compile": True}}  # fmt: skip


def parse_setting(setting: str) -> dict[str, bool]:
    """'bf16+channels_last' -> {"bf16": True, "channels_last": True, "torch_compile": False}."""
    flags = {"bf16": False, "channels_last": False, "torch_compile": False}
    for part in setting.strip().split("+"):
        if part not in SETTING_PARTS:
            raise ValueError(f"unknown setting {part!r} in {setting!r}; combine {sorted(SETTING_PARTS)} with +")
        flags.update(SETTING_PARTS[part])
    return flags


def cpu_matrix(args: BenchmarkArguments, config: CnnLstmConfig, split: CachedSplit) -> dict:
    """The plain loop under each CPU setting and thread count; ratios against eager fp32 at the same threads."""
    device = torch.device("cpu")
    settings = [setting.strip() for setting in args.settings.split(",") if setting.strip()]
    threads = [int(value) for value in args.threads.split(",")]
    settings = ["fp32", *(setting for setting in settings if setting != "fp32")]  # the baseline of every ratio first
    for setting in settings:
        parse_setting(setting)  # fail on a typo before minutes of measuring
    use_bf16, reason = choose_cpu_precision("auto")
    print(f"CPU: {cpu_model_name()}; precision auto -> {'bf16' if use_bf16 else 'fp32'} ({reason})")
    print(f"image size {config.image_size}, batch {args.batch_size}, {args.steps} timed steps after "
          f"{args.warmup_steps} warm-up step(s), plain loop")  # fmt: skip
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        baseline = None
        for setting in settings:
            flags = parse_setting(setting)
            run_args = dataclasses.replace(args, **flags)
            rate = plain_loop(config, split, run_args, device)
            torch._dynamo.reset()
            baseline = rate if setting == "fp32" else baseline  # fp32 runs first: every ratio is known at once
            row = {"threads": count, "setting": setting, **flags, "images_per_second": rate,
                   "ratio_vs_fp32": rate / baseline}  # fmt: skip
            rows.append(row)
            print(f"threads {count}  {setting:<24} {rate:7.2f} images/s  {row['ratio_vs_fp32']:.2f}x", flush=True)
    summary = {
        "device": f"CPU ({cpu_model_name()})",
        "cpu_precision_auto": "bf16" if use_bf16 else "fp32",
        "cpu_precision_reason": reason,
        "model_config": args.model_config,
        "image_size": config.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rows": rows,
        "torch": torch.__version__,
    }
    print(json.dumps(summary))
    return summary


def compare_paths(args: BenchmarkArguments, device: torch.device) -> dict:
    """The plain loop and the Trainer path on the same data and settings; prints both and their ratio."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = True
    config = model_config(args)
    split = synthetic_split(config, args.num_images, args.seed)
    if len(split) < args.batch_size:
        raise ValueError(f"--num_images {len(split)} is smaller than one batch ({args.batch_size})")
    runners = {"plain": plain_loop, "trainer": trainer_path}
    results = {}
    for name in args.order.split(","):
        results[name] = runners[name.strip()](config, split, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    summary = {
        "device": name,
        "model_config": args.model_config,
        "parameters": sum(p.numel() for p in CnnLstmForImageClassification(config).parameters()),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "torch_compile": args.torch_compile,
        "num_workers": args.num_workers,
        "plain_images_per_second": results["plain"],
        "trainer_images_per_second": results["trainer"],
        "ratio": results["trainer"] / results["plain"],
        "torch": torch.__version__,
    }
    print(f"device: {name}")
    print(f"plain PyTorch loop:   {results['plain']:.1f} images/s")
    print(f"transformers.Trainer: {results['trainer']:.1f} images/s")
    print(f"ratio Trainer / plain: {summary['ratio']:.3f}")
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if args.steps < 1 or args.warmup_steps < 1:
        raise ValueError("--steps and --warmup_steps must be >= 1 (timing starts at the end of a warm-up step)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.cpu_matrix:
        if device.type != "cpu":
            raise ValueError("--cpu_matrix measures CPU settings: pass --device cpu")
        config = model_config(args)
        summary = cpu_matrix(args, config, synthetic_split(config, args.num_images, args.seed))
    else:
        summary = compare_paths(args, device)
    if args.output_json:
        atomic_write_text(args.output_json, json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
