"""The training levers against shortcuts (issue 17): the outside-lung swap, the source adversary, the lung crop, and
a real tiny Trainer run with all of them that ships an audited model whose processor crops like training did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from train.training.input_pipeline import CachedSplit, DeviceBatchTransform, collate_uint8, decode_resize
from train.training.source_adversary import SourceAdversary


def test_swap_replaces_only_what_lies_outside_the_lungs():
    transform = DeviceBatchTransform([0.5], [0.5], 1, outside_lung_swap=1.0)
    pixels = torch.stack([torch.full((1, 8, 8), value, dtype=torch.uint8) for value in (10, 20, 30, 40)])
    masks = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    masks[:, :, 2:6, 2:6] = 1
    torch.manual_seed(0)
    swapped = transform.swap_outside_lungs(pixels.float(), masks)
    inside = masks.bool().expand_as(swapped)
    assert torch.equal(swapped[inside], pixels.float()[inside])  # the lungs are untouched
    for index in range(4):
        outside = swapped[index][~masks[index].bool()]
        assert outside.unique().numel() == 1 and outside[0] != pixels[index, 0, 0, 0]  # another film's surroundings
    never = DeviceBatchTransform([0.5], [0.5], 1, outside_lung_swap=0.0)
    assert torch.equal(never(pixels, train=True, lung_mask=masks), never(pixels, train=True))
    assert torch.equal(transform(pixels, train=False), never(pixels, train=False))  # evaluation never swaps
    with pytest.raises(ValueError, match="lung masks"):
        transform(pixels, train=True)
    with pytest.raises(ValueError, match="probability"):
        DeviceBatchTransform([0.5], [0.5], 1, outside_lung_swap=1.5)


def test_split_carries_masks_and_source_ids_through_the_batch():
    pixels = np.zeros((4, 1, 16, 16), np.uint8)
    pixels[:, :, 4:12, 2:7] = 200  # a bright body with dark lungs would do; here any image works
    split = CachedSplit(pixels, np.array([0, 1, 2, 0]), {"source": ["a", "b", "a", "zzz"]})
    extras = split.with_training_extras(lung_masks=True, source_names=["a", "b"])
    assert extras.masks.shape == (4, 1, 16, 16) and extras.masks.dtype == np.uint8
    assert extras.source_ids.tolist() == [0, 1, 0, -1]  # a source the adversary never trained on is ignored
    batch = collate_uint8(extras.torch_dataset().__getitems__([0, 2, 3]))
    assert batch["lung_mask"].shape == (3, 1, 16, 16) and batch["source_ids"].tolist() == [0, 0, -1]
    assert extras.subset([1, 3]).source_ids.tolist() == [1, -1]
    assert CachedSplit.concatenate([extras, extras]).masks.shape[0] == 8
    plain = collate_uint8([extras.torch_dataset()[0], extras.torch_dataset()[1]])
    assert plain["source_ids"].tolist() == [0, 1] and plain["lung_mask"].shape == (2, 1, 16, 16)


def test_adversary_reverses_its_gradient_into_the_network(tiny_config):
    config = tiny_config()
    adversary = SourceAdversary(config, num_sources=3, weight=1.0)
    features = torch.randn(6, config.fc_size, requires_grad=True)
    adversary._features = features
    labels, sources = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 2, 2, -1, 0])
    loss = adversary.loss(labels, sources, progress=1.0)
    loss.backward()
    # the head learns to name the source (its own gradient descends the loss) ...
    head_grad = adversary.layers[0].weight.grad.clone()
    # ... while the features get the opposite of the gradient that would help it
    expected = torch.autograd.grad(
        torch.nn.functional.cross_entropy(
            adversary.layers(torch.cat([features, torch.nn.functional.one_hot(labels, 3).float()], 1))[sources >= 0],
            sources[sources >= 0],
        ) * adversary.ramp(1.0),
        features,
    )[0]
    assert torch.allclose(features.grad, -expected, atol=1e-6) and head_grad.abs().sum() > 0
    assert adversary.ramp(0.0) == 0.0 and 0.99 < adversary.ramp(1.0) <= 1.0
    with pytest.raises(RuntimeError, match="watch"):
        adversary.loss(labels, sources, 0.5)
    with pytest.raises(ValueError, match="at least 2"):
        SourceAdversary(config, num_sources=1, weight=1.0)


@pytest.mark.shared_data
def test_decode_resize_crops_like_the_processor(xray_paths):
    from PIL import Image

    from modeling_cnn_lstm import CnnLstmImageProcessor

    with Image.open(xray_paths["covid19"][0]) as image:
        image.load()
        cached = decode_resize(image, 64, 3, crop_to_lungs=True).astype(np.float32)
        processor = CnnLstmImageProcessor(size={"height": 64, "width": 64}, crop_to_lungs=True, do_normalize=False,
                                          do_rescale=False)  # fmt: skip
        expected = processor(image, return_tensors="pt")["pixel_values"][0, :1].numpy()
    assert np.abs(cached - expected).max() <= 0.5 + 1e-4  # only the uint8 rounding differs
    assert not np.array_equal(cached, decode_resize(image, 64, 3).astype(np.float32))


@pytest.mark.shared_data
def test_tiny_run_with_every_lever_ships_an_audited_cropping_model(
    tiny_corpus: Path, tmp_path: Path, run_main, tiny_args
):
    final = run_main(tiny_args(tiny_corpus, tmp_path / "run", "--crop_to_lungs", "true", "--outside_lung_swap",
                               "0.5", "--source_adversary_weight", "0.3", "--audit_ig_per_class", "1"))  # fmt: skip
    assert json.loads((final / "preprocessor_config.json").read_text())["crop_to_lungs"] is True
    assert json.loads((final / "config.json").read_text())["crop_to_lungs"] is True
    assert (final / "lung_region_cnn_lstm.py").is_file()  # the processor's code travels with the model
    report = json.loads((final / "report" / "metrics.json").read_text())
    audit = report["shortcut_audit"]
    assert audit["split"] == "test" and set(audit["conditions"]) == {"original", "lungs_hidden", "lungs_only"}
    assert "lungs hidden" in (final / "README.md").read_text() and "Source probe" in (final / "report" /
                                                                                          "report.md").read_text()
    from modeling_cnn_lstm import CnnLstmForImageClassification

    model = CnnLstmForImageClassification.from_pretrained(final)
    assert not any("adversary" in name for name in model.state_dict())  # training-only head, never saved


@pytest.mark.shared_data
def test_hide_lungs_fills_the_fields_with_the_image_mean(xray_paths):
    from PIL import Image

    from train.training.input_pipeline import hide_lungs_uint8, lung_masks_of

    with Image.open(xray_paths["normal"][0]) as image:
        pixels = decode_resize(image, 96, 1)[None]
    hidden = hide_lungs_uint8(pixels)
    masks = lung_masks_of(pixels).astype(bool)
    assert hidden.shape == pixels.shape and hidden.dtype == np.uint8
    assert np.array_equal(hidden[~masks], pixels[~masks])  # outside the lungs: untouched
    assert np.all(hidden[masks] == np.uint8(round(float(pixels.mean()))))  # inside: one flat mean
    assert 0.1 < masks.mean() < 0.6


@pytest.mark.shared_data
def test_exclude_sources_leaves_them_out_of_training_and_validation_only(tiny_corpus: Path):
    from datasets import load_from_disk

    from train.training.experiment import exclude_sources

    corpus = load_from_disk(str(tiny_corpus))
    sources = sorted(set(corpus["train"]["source"]))
    dropped = sources[0]
    kept = exclude_sources(corpus, ["train", "validation"], f" {dropped} ,")
    assert dropped not in set(kept["train"]["source"]) | set(kept["validation"]["source"])
    assert len(kept["train"]) == sum(source != dropped for source in corpus["train"]["source"])
    assert kept["test"]["source"] == corpus["test"]["source"]  # the scored split is left as it is
    assert len(corpus["train"]) > len(kept["train"])  # the caller's dataset is not changed
    with pytest.raises(ValueError, match="unknown source"):
        exclude_sources(corpus, ["train"], "no-such-collection")


def test_final_logits_are_the_fp32_graph_even_after_bf16_training(tiny_config, tmp_path: Path):
    """The report scores the weights as they ship: no autocast in `predict_logits`, whatever the run's precision."""
    from transformers import TrainingArguments

    from modeling_cnn_lstm import CnnLstmForImageClassification
    from train.training.trainer import batch_transform_for, make_trainer, predict_logits

    torch.manual_seed(0)
    config = tiny_config()
    model = CnnLstmForImageClassification(config)
    rng = np.random.default_rng(0)
    split = CachedSplit(rng.integers(0, 255, (10, 1, 32, 32), dtype=np.uint8), rng.integers(0, 3, 10))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True, per_device_eval_batch_size=4,
                             report_to="none", remove_unused_columns=False)  # fmt: skip
    trainer = make_trainer(model, args, split, split, batch_transform_for(config, 0.0, False))
    trainer.train()  # one epoch under bf16 autocast: the Trainer's model now runs its forward in autocast
    logits = predict_logits(trainer, split)
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        expected = model(pixel_values=trainer.batch_transform(torch.from_numpy(split.pixels), train=False)).logits
    assert logits.shape == (10, 3) and np.allclose(logits, expected.double().numpy(), atol=1e-6)
    assert not torch.is_autocast_enabled("cpu")
