"""The trained model in `checkpoints/cnn-lstm-cxr3/`: a Hub folder that loads offline in a fresh process, classifies
the example images through `pipeline`, and reproduces the per-image test predictions its card's metrics come from."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = REPO_ROOT / "checkpoints" / "cnn-lstm-cxr3"
LABELS = ["COVID-19", "Normal", "Pneumonia"]
PER_CLASS = 2  # test images checked per class

CLASSIFY = """
import json, sys
import numpy as np
from PIL import Image
from transformers import pipeline
assert "modeling_cnn_lstm" not in sys.modules
classify = pipeline("image-classification", model=sys.argv[1], trust_remote_code=True)
out = {}
for path in sys.argv[2:]:
    with Image.open(path) as image:
        scores = classify(np.asarray(image.convert("L")), top_k=None)
    out[path] = {item["label"]: item["score"] for item in scores}
print(json.dumps({"module": type(classify.model).__module__, "scores": out}))
"""


@pytest.fixture(scope="module")
def report() -> dict:
    path = SHIPPED / "report" / "metrics.json"
    assert path.is_file(), f"the trained checkpoint must ship at {SHIPPED} (README 'Training on a CPU')"
    return json.loads(path.read_text())


def test_folder_is_float16_shards_that_load_as_float32(report: dict):
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["dtype"] == "float32" and config["image_size"] == 224 and config["head_type"] == "lstm"
    assert config["block_widths"] == [[64, 64], [128, 128], [256, 256], [512, 512, 512], [512, 512, 512]]
    assert config["lstm_hidden_size"] == 512 and config["fc_size"] == 64 and config["use_batch_norm"]
    assert config["id2label"] == {str(index): label for index, label in enumerate(LABELS)}
    assert config["calibration_temperature"] == pytest.approx(report["calibration"]["temperature"])
    assert config["calibration_temperature"] != 1.0  # fitted on validation
    shards = sorted(SHIPPED.glob("model*.safetensors"))
    assert len(shards) > 1 and (SHIPPED / "model.safetensors.index.json").is_file()
    for shard in shards:
        assert shard.stat().st_size <= 15 * 1000**2 + 64 * 1024, shard  # 15 MB shards (+ header)
        with safe_open(shard, "pt") as handle:
            assert {str(handle.get_slice(name).get_dtype()) for name in handle.keys()} <= {"F16", "I64"}  # noqa: SIM118
    for name in ("configuration_cnn_lstm.py", "modeling_cnn_lstm.py", "image_processing_cnn_lstm.py",
                 "lung_region_cnn_lstm.py"):  # fmt: skip
        assert (SHIPPED / name).is_file(), name
    processor = json.loads((SHIPPED / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 224, "width": 224}
    # the model that reads the lungs (issue 17): cropped to the lung fields in training and at inference alike
    assert config["crop_to_lungs"] is True and processor["crop_to_lungs"] is True


def test_card_states_the_report_numbers(report: dict):
    card = (SHIPPED / "README.md").read_text()
    assert "{{" not in card and "Research use only" in card
    macro_f1 = report["metrics"]["macro_f1"]
    assert f"{100 * macro_f1:.1f}" in card
    for plot in report["plots"].values():
        assert (SHIPPED / "report" / plot).is_file(), plot
    assert report["num_samples"] == 209  # the whole patient-disjoint test split of ../shared/data/cxr3


@pytest.mark.shared_data
def test_fresh_process_pipeline_reproduces_the_reported_test_predictions(
    report: dict, cxr3_dir: Path, tmp_path: Path
):
    """Rebuild the corpus (deterministic), take a few test images per class, classify them with `pipeline` in a
    process that has never imported this repository, and compare with the report's per-image probabilities."""
    from train.training.dataset_loading import load_dataset_dict

    with open(SHIPPED / "report" / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == report["num_samples"]
    test = load_dataset_dict(str(cxr3_dir), None, tmp_path)["test"].cast_column("image", _undecoded())
    assert [row["sha256"] for row in rows] == test["sha256"]  # same split, same order
    chosen = []
    for label in LABELS:
        chosen += [row for row in rows if row["label"] == label][:PER_CLASS]
    paths = []
    for row in chosen:  # the built corpus embeds the JPEG bytes: write them out as files
        image = test[int(row["index"])]["image"]
        path = tmp_path / f"{row['index']}-{Path(image['path']).name}"
        path.write_bytes(image["bytes"])
        paths.append(str(path))
    examples = sorted(str(path) for path in (REPO_ROOT / "examples").glob("*.jpg"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run(
        [sys.executable, "-c", CLASSIFY, str(SHIPPED), *paths, *examples],
        cwd=tmp_path,  # not the repository: the model's code comes from the folder (remote code)
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.")
    for row, path in zip(chosen, paths, strict=True):
        scores = result["scores"][path]
        for label in LABELS:  # the processor resizes in float, the training cache rounded to uint8 first
            assert scores[label] == pytest.approx(float(row[f"p_{label}"]), abs=0.02), (path, label)
        assert max(scores, key=scores.get) == row["predicted"] or abs(
            sorted(scores.values())[-1] - sorted(scores.values())[-2]
        ) < 0.02
    for path in examples:
        assert set(result["scores"][path]) == set(LABELS)
        assert sum(result["scores"][path].values()) == pytest.approx(1.0, abs=1e-4)


def _undecoded():
    from datasets import Image

    return Image(decode=False)


@pytest.mark.slow
def test_python_app_py_serves_the_trained_model(report: dict, tmp_path: Path, app_server):
    """`python app.py` with no arguments (a fresh clone) serves this checkpoint: the example images get the same
    calibrated probabilities as the model computes here, and Grad-CAM returns an overlay."""
    import torch
    from gradio_client import Client, handle_file
    from PIL import Image

    from modeling_cnn_lstm import CnnLstmForImageClassification, CnnLstmImageProcessor

    model = CnnLstmForImageClassification.from_pretrained(SHIPPED).eval()  # forward: the exact fp32 graph
    processor = CnnLstmImageProcessor.from_pretrained(SHIPPED)
    examples = sorted((REPO_ROOT / "examples").glob("*.jpg"))[:3]
    with app_server(None, tmp_path) as url:
        client = Client(url, verbose=False)
        for path in examples:
            label, summary = client.predict(handle_file(str(path)), api_name="/predict")
            served = {item["label"]: item["confidence"] for item in label["confidences"]}
            with Image.open(path) as image, torch.no_grad():
                inputs = processor(image.convert("L"), return_tensors="pt")
                expected = model(**inputs).logits.softmax(-1)[0].tolist()  # the config's temperature applied
            # the app predicts through model.fast_cpu_inference(): fp32 here, bf16 where a CPU runs it faster
            for name, probability in zip(LABELS, expected, strict=True):
                assert served[name] == pytest.approx(probability, abs=0.02), (path.name, name)
            top, second = sorted(expected)[-2:][::-1]
            assert label["label"] == LABELS[int(torch.tensor(expected).argmax())] or top - second < 0.04
            assert label["label"] in summary and "not for diagnosis" in summary
        overlay, note = client.predict(
            handle_file(str(examples[0])), "Grad-CAM", "Predicted class", api_name="/explain"
        )
        with Image.open(overlay) as image:  # the trained model's map colours part of the grayscale film
            pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 30
        assert coloured.mean() > 0.01 and "Grad-CAM" in note
