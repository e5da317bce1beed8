"""The pieces under train/run.py: arguments, input pipeline, calibration, card rendering, atomic folder writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_cnn_lstm import CnnLstmConfig, CnnLstmImageProcessor
from tests.train_helpers import REPO_ROOT, TINY_CONFIG
from train.training.arguments import parse_args
from train.training.calibration import fit_temperature, negative_log_likelihood
from train.training.hub_folder import atomic_folder
from train.training.input_pipeline import (
    DeviceBatchTransform,
    UInt8ImageDataset,
    cache_images,
    collate_uint8,
    decode_resize,
)
from train.training.model_card import CardError, render_model_card

CONFIGS = REPO_ROOT / "train" / "configs"
CPU = ["--use_cpu", "--bf16", "false", "--tf32", "false", "--torch_compile", "false"]


def test_paper_configs_parse_with_cli_overrides():
    model_args, data_args, eval_args, training_args = parse_args(
        ["--config", str(CONFIGS / "paper.json"), *CPU, "--learning_rate", "3e-4", "--output_dir", "/tmp/unused"]
    )
    assert training_args.learning_rate == 3e-4  # the command line wins over the file
    assert training_args.num_train_epochs == 125 and training_args.per_device_train_batch_size == 64
    assert str(getattr(training_args.optim, "value", training_args.optim)) == "rmsprop"
    assert training_args.metric_for_best_model == "macro_f1" and training_args.load_best_model_at_end
    assert model_args.head_type == "lstm" and model_args.use_batch_norm and model_args.block_dropout == 0.0
    assert data_args.rotation_degrees == 15
    assert model_args.build_config().block_widths == CnnLstmConfig().block_widths
    assert eval_args.early_stopping_patience == 25
    cnn_args = parse_args(["--config", str(CONFIGS / "paper_cnn.json"), *CPU])[0]
    assert cnn_args.head_type == "dense"
    tiny = parse_args(["--config", str(TINY_CONFIG), "--block_widths", "[[4], [8]]"])[0]
    assert tiny.build_config().block_widths == [[4], [8]] and tiny.image_size == 32


def test_unknown_config_key_fails(tmp_path: Path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"learning_rat": 1e-4, "_comment": "comments are fine"}))
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rat'\]"):
        parse_args(["--config", str(config)])
    with pytest.raises(ValueError, match="max_train_samples must be >= 1"):
        parse_args(["--config", str(TINY_CONFIG), "--max_train_samples", "0"])


def test_uint8_path_matches_the_image_processor(xray_paths: dict[str, list[Path]]):
    """Cache (decode + resize + uint8) then device transform == the processor's float path, to uint8 rounding."""
    config = CnnLstmConfig(image_size=48, block_widths=[[4], [8]])
    processor = CnnLstmImageProcessor.from_model_config(config)
    images = [Image.open(path) for path in xray_paths["normal"][:2] + xray_paths["covid19"][:1]]
    cached = np.stack([decode_resize(image, 48, 3) for image in images])
    assert cached.dtype == np.uint8 and cached.shape == (3, 1, 48, 48)  # grayscale stored with one channel
    transform = DeviceBatchTransform(config.image_mean, config.image_std, 3, rotation_degrees=15)
    ours = transform(torch.from_numpy(cached), train=False)
    reference = processor(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == reference.shape == (3, 3, 48, 48)
    max_step = 0.5 / 255 / min(config.image_std) + 1e-5  # half a uint8 level, normalized
    assert (ours - reference).abs().max().item() <= max_step


def test_rotation_only_in_training_and_channels_last():
    pixels = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    pixels[:, :, 8:24, 14:18] = 255  # a vertical bar: any rotation moves pixels off it
    transform = DeviceBatchTransform([0.5] * 3, [0.25] * 3, 3, rotation_degrees=15, channels_last=True)
    evaluation = transform(pixels, train=False)
    torch.manual_seed(0)
    training = transform(pixels, train=True)
    assert evaluation.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(evaluation[:, 0], evaluation[:, 2])
    assert evaluation[0, 0, 8, 14].item() == pytest.approx((1.0 - 0.5) / 0.25)
    assert not torch.allclose(training, evaluation)
    assert not torch.allclose(training[0], training[1])  # one angle per image
    unrotated = DeviceBatchTransform([0.5] * 3, [0.25] * 3, 3, rotation_degrees=0)(pixels, train=True)
    assert torch.allclose(unrotated, evaluation)


def test_batches_are_gathered_in_one_copy():
    pixels = np.arange(5 * 1 * 4 * 4, dtype=np.uint8).reshape(5, 1, 4, 4)
    dataset = UInt8ImageDataset(pixels, np.array([0, 1, 2, 1, 0]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_uint8)
    batches = list(loader)
    assert [len(batch["labels"]) for batch in batches] == [2, 2, 1]
    assert torch.equal(batches[1]["pixel_values"], torch.from_numpy(pixels[2:4]))
    assert batches[1]["labels"].tolist() == [2, 1] and batches[1]["labels"].dtype == torch.int64
    single = collate_uint8([dataset[0], dataset[3]])
    assert torch.equal(single["pixel_values"], torch.from_numpy(pixels[[0, 3]]))


def test_image_cache_is_reused_from_disk(xray_paths: dict[str, list[Path]], tmp_path: Path):
    from datasets import Dataset, Features, Image

    dataset = Dataset.from_dict(
        {"image": [str(p) for p in xray_paths["pneumonia"][:3]]}, features=Features({"image": Image()})
    )
    first = cache_images(dataset, 24, 3, cache_dir=tmp_path, num_workers=1)
    (cache_file,) = tmp_path.glob("*.npy")
    np.save(cache_file, np.zeros_like(first))  # a changed file proves the second call reads it
    second = cache_images(dataset, 24, 3, cache_dir=tmp_path, num_workers=1)
    assert first.any() and not second.any()
    assert np.array_equal(cache_images(dataset, 24, 3, cache_dir=None, num_workers=1), first)


def test_temperature_scaling_recovers_the_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=2.0, size=(4000, 3))
    probabilities = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in probabilities])
    overconfident = true_logits * 2.5  # a model whose logits are 2.5x too large
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(2.5, rel=0.1)
    assert negative_log_likelihood(overconfident, labels, temperature) < negative_log_likelihood(overconfident, labels)


def test_card_rendering_refuses_missing_values():
    assert render_model_card("a {{ x }} b {{y}}", {"x": 1, "y": "two"}) == "a 1 b two"
    with pytest.raises(CardError, match=r"\['y'\]"):
        render_model_card("{{ x }} {{ y }}", {"x": 1})
    with pytest.raises(CardError, match="placeholder"):
        render_model_card("{{ x }}", {"x": "{{ nested }}"})


def test_atomic_folder_keeps_the_old_folder_on_failure(tmp_path: Path):
    destination = tmp_path / "final"
    atomic_folder(destination, lambda folder: (folder / "a.txt").write_text("first"))

    def broken(folder: Path) -> None:
        (folder / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_folder(destination, broken)
    assert (destination / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    atomic_folder(destination, lambda folder: (folder / "b.txt").write_text("second"))
    assert sorted(p.name for p in destination.iterdir()) == ["b.txt"]


ENTRY_POINTS = [
    "train/run.py",
    "scripts/evaluate_checkpoint.py",
    "scripts/benchmark_train.py",
    "scripts/shortcut_audit.py",
    "scripts/update_card.py",
]


def load_script(script: str):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"entry_{Path(script).stem}", REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_of_every_entry_point(script: str, capsys: pytest.CaptureFixture):
    """argparse formats every help string (a stray % would only fail here)."""
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("script", "arguments"),
    [("scripts/evaluate_checkpoint.py", "EvaluateArguments"), ("scripts/shortcut_audit.py", "AuditArguments")],
)
def test_evaluation_scripts_default_to_exact_fp32(script: str, arguments: str, capsys: pytest.CaptureFixture):
    """Reported metrics come from the exact fp32 PyTorch path on CPU, not the checkpoint's 'auto' (bf16), in both
    scripts, and --help says so; both read data through the one shared train.training.dataset_loading.load_split."""
    import train.training.dataset_loading

    module = load_script(script)
    assert getattr(module, arguments).__dataclass_fields__["cpu_inference_backend"].default == "torch"
    assert module.load_split is train.training.dataset_loading.load_split
    with pytest.raises(SystemExit):
        module.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--cpu_inference_backend" in help_text and "Default torch: exact fp32 PyTorch" in help_text
