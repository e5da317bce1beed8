"""`train/run.py` on the tiny config with real X-rays on CPU: every artifact, CV, data errors, resume, seeds.

Each run is a few optimizer steps of a 13k-parameter model at 32x32; what is tested is the plumbing and the
artifacts, not accuracy.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from train.training.dataset_loading import DataError

pytestmark = pytest.mark.shared_data  # every run here trains on real X-rays from ../shared/data/cxr3
REPO_ROOT = Path(__file__).resolve().parents[2]
LABEL_NAMES = ["COVID-19", "Normal", "Pneumonia"]
HUB_TOKEN = "hf_never-saved-token"  # given to the tiny run; no file it writes may hold it
CORPUS_OPTIONS = json.dumps({"num_folds": 2, "test_fraction": 0.25, "num_workers": 1, "benchmark_images": 0})
PLOTS = (
    "confusion_matrix",
    "accuracy_curves",
    "loss_curves",
    "per_class_metrics",
    "roc_curves",
    "reliability_diagram",
)


@pytest.fixture(scope="module")
def tiny_run(mini_cxr3: Path, tmp_path_factory: pytest.TempPathFactory, run_main, tiny_args) -> Path:
    """One tiny run from a RAW cxr3-layout folder: the corpus builder runs on the fly."""
    output_dir = tmp_path_factory.mktemp("tiny-run")
    final = run_main(tiny_args(mini_cxr3, output_dir, "--corpus_options", CORPUS_OPTIONS, "--hub_token", HUB_TOKEN))
    assert final == output_dir / "final"
    return output_dir


def assert_fraction(value: object) -> None:
    assert isinstance(value, float) and 0.0 <= value <= 1.0, value


def test_final_folder_is_a_hub_model_repo(tiny_run: Path):
    final = tiny_run / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(LABEL_NAMES)}
    assert config["calibration_temperature"] > 0 and config["calibration_temperature"] != 1.0
    for reference in (*config["auto_map"].values(), *json.loads((final / "preprocessor_config.json").read_text())[
            "auto_map"].values()):  # fmt: skip
        assert (final / f"{reference.split('.')[0]}.py").is_file()
    assert (final / "model.safetensors").is_file() and (final / "README.md").is_file()
    assert not list(tiny_run.glob(".final.*")), "temporary folders left behind"
    assert (tiny_run / "corpus" / "dataset_dict.json").is_file(), "the raw folder was not built into a corpus"


def test_hub_token_is_in_no_saved_file(tiny_run: Path):
    """TrainingArguments are pickled into every checkpoint's training_args.bin: --hub_token must not be in them."""
    saved = sorted(tiny_run.rglob("training_args.bin"))
    assert saved
    for path in saved:
        assert torch.load(path, weights_only=False).hub_token is None, path
    leaking = [str(path) for path in tiny_run.rglob("*") if path.is_file() and HUB_TOKEN.encode() in path.read_bytes()]
    assert leaking == []


def test_metrics_json_keys_and_ranges(tiny_run: Path):
    report = json.loads((tiny_run / "final" / "report" / "metrics.json").read_text())
    metrics = report["metrics"]
    for key in ("accuracy", "macro_precision", "macro_sensitivity", "macro_specificity", "macro_f1", "macro_auc"):
        assert_fraction(metrics[key])
    for values in metrics["per_class"].values():
        for key in ("accuracy", "sensitivity", "specificity", "auc"):
            assert_fraction(values[key])
    assert list(metrics["per_class"]) == LABEL_NAMES
    assert np.asarray(metrics["confusion_matrix"]).sum() == report["num_samples"] > 0
    calibration = report["calibration"]
    assert calibration["fitted_on"] == "validation"
    assert_fraction(calibration["ece_before"])
    assert_fraction(calibration["ece_after"])
    intervals = report["bootstrap"]["intervals"]
    assert report["bootstrap"]["unit"] == "patient"
    for key in ("accuracy", "macro_f1", "macro_auc"):
        assert intervals[key]["low"] <= metrics[key] <= intervals[key]["high"]
    assert list(report["bootstrap"]["per_class"]) == LABEL_NAMES  # per-class intervals from the same resamples
    assert report["bootstrap"]["seed"] == 42  # the run's --seed (train/configs/tiny.json)
    assert report["per_source"] and all(v["num_samples"] > 0 for v in report["per_source"].values())
    assert sum(v["num_samples"] for v in report["per_source"].values()) == report["num_samples"]
    assert report["run"]["world_size"] == 1
    history = json.loads((tiny_run / "final" / "report" / "training_history.json").read_text())["training"]
    assert any("train_accuracy" in entry for entry in history)
    assert any("eval_macro_f1" in entry for entry in history)


def test_plots_are_valid_pngs(tiny_run: Path):
    for name in PLOTS:
        path = tiny_run / "final" / "report" / f"{name}.png"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_model_card_rendered_without_placeholders(tiny_run: Path):
    text = (tiny_run / "final" / "README.md").read_text()
    assert "{{" not in text and "}}" not in text
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-classification"
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] is not None
    assert "Research use only" in text and "Not for diagnosis" in text
    assert "| COVID-19 |" in text and "99.4" in text  # per-class table and the paper comparison
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tiny_run / "final" / image).is_file(), image


def test_checkpoint_loads_and_predicts_through_pipeline(tiny_run: Path, mini_cxr3: Path):
    from transformers import AutoModelForImageClassification, pipeline

    final = tiny_run / "final"
    model = AutoModelForImageClassification.from_pretrained(final, trust_remote_code=True)
    weights = load_file(final / "model.safetensors")
    assert torch.equal(model.state_dict()["head.classifier.weight"], weights["head.classifier.weight"])
    classifier = pipeline("image-classification", model=str(final), trust_remote_code=True)
    image_path = next((mini_cxr3 / "images" / "covid19").glob("*.jpg"))
    predictions = classifier(str(image_path))
    assert sorted(p["label"] for p in predictions) == sorted(LABEL_NAMES)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)


@pytest.fixture(scope="module")
def tiny_corpus3(make_dataset_dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mini_cxr3` with three patient-grouped folds (CV needs training, selection and scored folds)."""
    destination = tmp_path_factory.mktemp("tiny-corpus3") / "corpus"
    make_dataset_dict(num_folds=3).save_to_disk(str(destination))
    return destination


def test_cross_validation_on_folds(
    tiny_corpus3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_main, tiny_args
):
    """k = 3: each fold's model trains on one fold, is selected (checkpoint, early stopping, temperature) on the
    next and scored on its own; the scored fold's images reach neither training nor selection."""
    import train.training.cv

    calls: list[tuple[str, set[int], set[str]]] = []  # (role, folds, patient ids) of every split handed over

    def record(role: str, split) -> None:
        if split is not None:
            calls.append((role, set(split.columns["fold"]), set(split.columns["patient_id"])))

    real_fit, real_predict = train.training.cv.fit, train.training.cv.predict_logits

    def fit(ctx, model, args, train_split, eval_split, **kwargs):
        record("train", train_split)
        record("select", eval_split)
        return real_fit(ctx, model, args, train_split, eval_split, **kwargs)

    def predict_logits(trainer, split):
        record("predict", split)
        return real_predict(trainer, split)

    monkeypatch.setattr(train.training.cv, "fit", fit)
    monkeypatch.setattr(train.training.cv, "predict_logits", predict_logits)
    output_dir = tmp_path / "cv"
    half = ("--save_dtype", "float16", "--max_shard_size", "20KB")  # as issue 6 ships: small fp16 shards
    final = run_main(tiny_args(tiny_corpus3, output_dir, "--cross_validation", "3", "--max_steps", "2", *half))
    cv = json.loads((output_dir / "cv_results.json").read_text())
    assert [fold["fold"] for fold in cv["folds"]] == [0, 1, 2]
    assert [fold["selection_fold"] for fold in cv["folds"]] == [1, 2, 0]
    assert [fold["training_folds"] for fold in cv["folds"]] == [[2], [0], [1]]
    # per fold: fit(train, select), predict(select) for the temperature, predict(scored); then the final model
    assert len(calls) == 3 * 4 + 2
    for fold in (0, 1, 2):
        trained, selected, calibrated, scored = calls[4 * fold : 4 * fold + 4]
        assert [trained[0], selected[0], calibrated[0], scored[0]] == ["train", "select", "predict", "predict"]
        (_, train_folds, train_ids), (_, select_folds, select_ids) = trained, selected
        (_, temp_folds, _), (_, scored_folds, scored_ids) = calibrated, scored
        assert train_folds == {(fold + 2) % 3} and select_folds == temp_folds == {(fold + 1) % 3}
        assert scored_folds == {fold}
        assert not scored_ids & (train_ids | select_ids), "scored images used for training or selection"
        result = json.loads((output_dir / f"fold-{fold}" / "fold_result.json").read_text())
        folds_of_rows = np.asarray(cv_pooled_folds(tiny_corpus3))[result["indices"]]
        assert set(folds_of_rows.tolist()) == {fold} and len(result["indices"]) == len(result["logits"])
        evaluations = [entry for entry in result["log_history"] if "eval_macro_f1" in entry]
        assert evaluations, "the checkpoint was chosen without evaluations on the selection fold"
    assert calls[-2][0] == "train" and calls[-2][1] == {0, 1, 2}  # final model: every non-test fold, no selection
    assert calls[-1][0] == "predict" and calls[-1][1] == {-1}  # then only the test split
    for key in ("accuracy", "macro_f1", "macro_auc"):
        values = [fold["metrics"][key] for fold in cv["folds"]]
        assert cv["summary"][key]["mean"] == pytest.approx(np.mean(values))
        assert cv["summary"][key]["std"] == pytest.approx(np.std(values, ddof=1))
    for fold in (0, 1, 2):
        assert (output_dir / f"fold-{fold}" / "fold_result.json").is_file()
        assert not list((output_dir / f"fold-{fold}").glob("checkpoint-*"))
    log = (output_dir / "training_log.txt").read_text()  # one file for the whole CV run, each line says its model
    for fold in (0, 1, 2):
        assert re.search(rf"fold {fold} epoch [\d.]+/[\d.]+ \| train loss [\d.]+ \| val macro-F1 [\d.]+ \|", log)
    assert re.search(r"final model \(all non-test data\) epoch [\d.]+/[\d.]+ \| .* \| val macro-F1 n/a", log), log
    report = json.loads((final / "report" / "metrics.json").read_text())
    assert report["calibration"]["fitted_on"] == "out-of-fold cross-validation"
    assert report["cross_validation"]["k"] == 3
    text = (final / "README.md").read_text()
    assert "3-fold cross-validation" in text and "+-" in text and "{{" not in text
    assert "inner validation fold (f + 1) mod 3" in text
    shards = sorted(final.glob("model-*.safetensors"))
    dtypes = {tensor.dtype for shard in shards for tensor in load_file(shard).values() if tensor.is_floating_point()}
    assert len(shards) > 1 and dtypes == {torch.float16}
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(final, trust_remote_code=True)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert model.config.calibration_temperature == pytest.approx(report["calibration"]["temperature"])


def cv_pooled_folds(corpus: Path) -> list[int]:
    """The fold column in the order cross-validation pools the rows (train, then validation)."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(corpus))
    return [*dataset["train"]["fold"], *dataset["validation"]["fold"]]


def test_cross_validation_needs_three_folds(tiny_corpus3: Path, tmp_path: Path, run_main, tiny_args):
    with pytest.raises(ValueError, match="k >= 3"):
        run_main(tiny_args(tiny_corpus3, tmp_path / "cv2", "--cross_validation", "2"))


def test_label_mismatch_fails_before_training(make_dataset_dict, tmp_path: Path, run_main, tiny_args):
    corpus = tmp_path / "wrong-labels"
    make_dataset_dict(label_names=["covid", "normal", "pneumonia"]).save_to_disk(str(corpus))
    with pytest.raises(DataError, match=r"label names \['covid', 'normal', 'pneumonia'\] do not match"):
        run_main(tiny_args(corpus, tmp_path / "out"))
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_empty_split_fails_before_training(make_dataset_dict, tmp_path: Path, run_main, tiny_args):
    dataset = make_dataset_dict()
    dataset["validation"] = dataset["validation"].select([])
    dataset.save_to_disk(str(tmp_path / "empty-validation"))
    with pytest.raises(DataError, match="split 'validation' is empty"):
        run_main(tiny_args(tmp_path / "empty-validation", tmp_path / "out"))
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_missing_split_and_missing_folds_fail(tiny_corpus: Path, tmp_path: Path, run_main, tiny_args):
    with pytest.raises(DataError, match="no split"):
        run_main(tiny_args(tiny_corpus, tmp_path / "a", "--test_split", "holdout"))
    with pytest.raises(DataError, match="folds are \\[0, 1\\]"):
        run_main(tiny_args(tiny_corpus, tmp_path / "b", "--cross_validation", "3"))


def test_resume_and_seed_repeatability(tiny_corpus: Path, tmp_path: Path, run_main, tiny_args):
    """4 steps, then resumed to 6, equals 6 straight steps; the same seed twice gives the same weights."""
    common = ("--bootstrap_samples", "0", "--load_best_model_at_end", "false", "--no_calibrate")
    run_main(tiny_args(tiny_corpus, tmp_path / "resumed", *common, "--max_steps", "4"))
    assert (tmp_path / "resumed" / "checkpoint-4").is_dir()
    run_main(
        tiny_args(tiny_corpus, tmp_path / "resumed", *common, "--max_steps", "6", "--resume_from_checkpoint", "true")
    )
    state = json.loads((tmp_path / "resumed" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    for name in ("straight", "again"):
        run_main(tiny_args(tiny_corpus, tmp_path / name, *common, "--max_steps", "6"))
    weights = {
        name: load_file(tmp_path / name / "final" / "model.safetensors") for name in ("resumed", "straight", "again")
    }
    for key, tensor in weights["straight"].items():
        assert torch.equal(tensor, weights["again"][key]), f"same seed, different {key}"
        assert torch.allclose(tensor, weights["resumed"][key], atol=1e-6), f"resume changed {key}"
    run_main(tiny_args(tiny_corpus, tmp_path / "other-seed", *common, "--max_steps", "6", "--seed", "7"))
    other = load_file(tmp_path / "other-seed" / "final" / "model.safetensors")
    assert not torch.equal(other["head.classifier.weight"], weights["straight"]["head.classifier.weight"])


def test_evaluate_script_on_a_cxr3_folder_prints_one_json_object(tiny_run: Path, mini_cxr3: Path, tmp_path: Path):
    command = [
        sys.executable,
        "scripts/evaluate_checkpoint.py",
        "--model",
        str(tiny_run / "final"),
        "--data_dir",
        str(mini_cxr3),
        "--output_dir",
        str(tmp_path / "eval"),
        "--bootstrap_samples",
        "20",
    ]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert summary["num_samples"] == 72  # every image of the folder, none deduplicated or split off
    for key in ("accuracy", "macro_f1", "macro_auc", "ece", "ece_uncalibrated"):
        assert_fraction(summary[key])
    assert set(summary["per_class"]) == set(LABEL_NAMES) and summary["per_source"]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["metrics"]["accuracy"] == summary["accuracy"]
    for name in ("confusion_matrix", "roc_curves", "per_class_metrics", "reliability_diagram"):
        with Image.open(tmp_path / "eval" / f"{name}.png") as image:
            image.verify()


def test_evaluate_script_on_the_built_test_split(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, load_script
):
    script = load_script("scripts/evaluate_checkpoint.py")
    arguments = ["--model", str(tiny_run / "final"), "--data_dir", str(tiny_run / "corpus"), "--output_dir"]
    summary = script.main([*arguments, str(tmp_path / "eval")])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(summary))
    training_report = json.loads((tiny_run / "final" / "report" / "metrics.json").read_text())
    assert summary["num_samples"] == training_report["num_samples"]
    # the processor's float path vs. the training cache's uint8 path: at most a borderline image may flip
    assert abs(summary["accuracy"] - training_report["metrics"]["accuracy"]) <= 1 / summary["num_samples"] + 1e-9
    assert summary["temperature"] == pytest.approx(training_report["calibration"]["temperature"])


def test_evaluate_script_keeps_an_existing_report_unless_overwrite(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, load_script
):
    """Default folder: evaluation/<model folder>__<data folder> under the current directory. A non-empty one is
    refused before the checkpoint is even loaded, unless --overwrite; then the new report replaces it whole."""
    script = load_script("scripts/evaluate_checkpoint.py")
    monkeypatch.chdir(tmp_path)
    arguments = ["--model", str(tiny_run / "final"), "--data_dir", str(tiny_run / "corpus")]
    arguments += ["--bootstrap_samples", "0"]
    summary = script.main(arguments)
    report_dir = tmp_path / "evaluation" / "final__corpus"
    assert summary["report_dir"] == str(Path("evaluation") / "final__corpus")
    assert (report_dir / "metrics.json").is_file()
    (report_dir / "mine.txt").write_text("keep")

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded although the report folder is refused")

    with monkeypatch.context() as patch:
        patch.setattr(script, "load_checkpoint", never)
        refused = r"--output_dir evaluation/final__corpus already exists; pass --overwrite"
        with pytest.raises(SystemExit, match=refused):
            script.main(arguments)
    assert (report_dir / "mine.txt").read_text() == "keep"
    script.main([*arguments, "--overwrite"])
    assert not (report_dir / "mine.txt").exists() and (report_dir / "metrics.json").is_file()
    assert [path.name for path in (tmp_path / "evaluation").iterdir()] == ["final__corpus"]  # no temporary folders
    capsys.readouterr()


@pytest.mark.slow
def test_paper_config_trains_one_step_on_cpu(tiny_corpus: Path, tmp_path: Path, run_main):
    """train/configs/paper.json as committed (224 px, 17.8 M parameters), with only the CPU switches changed."""
    cpu = ["--use_cpu", "--bf16", "false", "--tf32", "false", "--torch_compile", "false"]
    workers = ["--dataloader_num_workers", "0", "--dataloader_persistent_workers", "false"]
    limits = ["--max_steps", "1", "--max_train_samples", "4", "--max_eval_samples", "4", "--bootstrap_samples", "10"]
    config = str(REPO_ROOT / "train" / "configs" / "paper.json")
    argv = ["--config", config, *cpu, *workers, *limits, "--per_device_train_batch_size", "2"]
    final = run_main([*argv, "--data_dir", str(tiny_corpus), "--output_dir", str(tmp_path / "paper")])
    config = json.loads((final / "config.json").read_text())
    assert config["block_widths"] == [[64, 64], [128, 128], [256, 256], [512, 512, 512], [512, 512, 512]]
    assert config["use_batch_norm"] and config["head_type"] == "lstm" and config["image_size"] == 224
    assert "{{" not in (final / "README.md").read_text()


def test_update_card_rewrites_card_metrics_and_report_atomically(tiny_run: Path, tmp_path: Path):
    """scripts/update_card.py adds CV results to metrics.json, README.md and report.md (each written atomically);
    a template that fails to render leaves all three untouched."""
    import shutil

    folder = tmp_path / "final"
    shutil.copytree(tiny_run / "final", folder)
    fold = {"fold": 0, "metrics": {"accuracy": 0.5, "macro_f1": 0.4}, "best_epoch": 1.0}
    cv = {"k": 3, "folds": [fold, {**fold, "fold": 1}, {**fold, "fold": 2}], "protocol": "inner selection"}
    cv["summary"] = {"accuracy": {"mean": 0.5, "std": 0.0, "n": 3}}
    (tmp_path / "cv.json").write_text(json.dumps(cv))
    files = [folder / "README.md", folder / "report" / "metrics.json", folder / "report" / "report.md"]
    before = [path.read_text() for path in files]
    bad = tmp_path / "bad.md"
    bad.write_text("{{ no_such_field }}")
    script = [
        sys.executable,
        "scripts/update_card.py",
        "--model_dir",
        str(folder),
        "--cv_results",
        str(tmp_path / "cv.json"),
    ]
    proc = subprocess.run([*script, "--model_card_template", str(bad)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "no_such_field" in proc.stderr
    assert [path.read_text() for path in files] == before
    proc = subprocess.run(script, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(files[1].read_text())["cross_validation"]["k"] == 3
    for path in (files[0], files[2]):
        assert (
            "3-fold cross-validation" in path.read_text() and "inner validation fold (f + 1) mod 3" in path.read_text()
        )
    assert not [path for path in folder.rglob("*") if ".tmp-" in path.name], "temporary files left behind"


def test_a_timm_backbone_trains_through_run_py(tiny_corpus: Path, tmp_path: Path, run_main, tiny_args):
    """Every CnnLstmConfig field is an option of train/run.py (ModelArguments is built from its signature): the
    README's `backbone="resnet18"` trains end to end (a timm model created without pretrained weights, offline)."""
    from train.training.arguments import ARCHITECTURE_FIELDS, ModelArguments

    assert {"backbone", "kernel_size", "pool_size", "image_mean"} <= set(ARCHITECTURE_FIELDS)
    assert ModelArguments(backbone="resnet18", kernel_size=5).build_config().kernel_size == 5
    options = ["--backbone", "resnet18", "--image_size", "64", "--max_steps", "2", "--bootstrap_samples", "10",
               "--audit_ig_per_class", "0"]  # fmt: skip
    final = run_main(tiny_args(tiny_corpus, tmp_path / "run", *options))
    config = json.loads((final / "config.json").read_text())
    assert config["backbone"] == "resnet18" and config["backbone_pretrained"] is False
    report = json.loads((final / "report" / "metrics.json").read_text())
    assert report["num_samples"] > 0 and report["shortcut_audit"]["conditions"]["original"]["accuracy"] >= 0
