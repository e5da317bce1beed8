"""The pieces under train/run.py: arguments, input pipeline, calibration, card rendering, atomic writes, and the
entry points' command lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_common.atomic import DestinationExists, atomic_folder, atomic_write_text
from modeling_cnn_lstm import CnnLstmConfig, CnnLstmImageProcessor
from train.training import checkpoint_loading, dataset_loading
from train.training.arguments import parse_args
from train.training.calibration import fit_temperature, negative_log_likelihood
from train.training.input_pipeline import (
    DeviceBatchTransform,
    UInt8ImageDataset,
    cache_images,
    collate_uint8,
    decode_resize,
    default_cache_dir,
)
from train.training.model_card import CardError, render_model_card

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "train" / "configs"
TINY_CONFIG = CONFIGS / "tiny.json"
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


@pytest.mark.shared_data
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


@pytest.mark.shared_data
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
    assert [path.name for path in tmp_path.iterdir()] == [cache_file.name]  # no temporary file left beside it


def test_default_image_cache_is_under_huggingface_hubs_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """huggingface_hub's HF_HOME (HF_HOME, else XDG_CACHE_HOME/huggingface), as resolved when it was imported."""
    from huggingface_hub import constants

    assert default_cache_dir() == Path(os.environ["HF_HOME"]) / "cnn_lstm_image_cache"  # tests/conftest.py's
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "cnn_lstm_image_cache"


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


def write_file(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


def test_atomic_folder_keeps_the_old_folder_on_failure(tmp_path: Path):
    destination = tmp_path / "final"
    with atomic_folder(destination) as folder:
        write_file(folder, "a.txt", "first")
    with pytest.raises(RuntimeError, match="disk full"), atomic_folder(destination) as folder:
        write_file(folder, "a.txt", "half")
        raise RuntimeError("disk full")
    assert (destination / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    with atomic_folder(destination) as folder:
        write_file(folder, "b.txt", "second")
    assert sorted(p.name for p in destination.iterdir()) == ["b.txt"]


def test_atomic_folder_without_overwrite_keeps_a_folder_that_appeared(tmp_path: Path):
    """A non-empty destination that appeared while the new folder was filled stays, and the new folder goes."""
    destination = tmp_path / "corpus"
    with pytest.raises(DestinationExists), atomic_folder(destination, overwrite=False) as folder:
        write_file(folder, "new.txt", "new")
        destination.mkdir()
        write_file(destination, "theirs.txt", "theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    assert sorted(p.name for p in destination.iterdir()) == ["theirs.txt"]


def test_atomic_write_text_replaces_whole_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "x.txt"
    target.write_text("old")
    assert atomic_write_text(target, "new") == target and target.read_text() == "new"

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "newer")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


ENTRY_POINTS = [
    "train/run.py",
    "scripts/evaluate_checkpoint.py",
    "scripts/benchmark_train.py",
    "scripts/shortcut_audit.py",
    "scripts/update_card.py",
]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_of_every_entry_point(script: str, capsys: pytest.CaptureFixture, load_script):
    """argparse formats every help string (a stray % would only fail here)."""
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["scripts/evaluate_checkpoint.py", "scripts/shortcut_audit.py"])
def test_evaluation_scripts_share_their_loading(script: str, capsys: pytest.CaptureFixture, load_script):
    """Both scripts load the checkpoint as its users do (one `load_checkpoint`: fp32, eval mode, its own processor)
    and read data through the one `load_split`; no CPU-backend flag: the model's forward is exact fp32."""
    module = load_script(script)
    assert module.load_checkpoint is checkpoint_loading.load_checkpoint
    assert module.load_split is dataset_loading.load_split
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert "backend" not in capsys.readouterr().out
