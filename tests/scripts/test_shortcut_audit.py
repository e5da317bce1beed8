"""scripts/shortcut_audit.py: the audit of a trained tiny checkpoint on real images, as one JSON object and files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

LABEL_NAMES = ["COVID-19", "Normal", "Pneumonia"]


@pytest.fixture(scope="module")
def audit(load_script):
    return load_script("scripts/shortcut_audit.py")


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory, run_main, tiny_args) -> Path:
    output_dir = tmp_path_factory.mktemp("audit-tiny-run")
    return run_main(tiny_args(tiny_corpus, output_dir, "--bootstrap_samples", "0", "--shortcut_audit", "false"))


@pytest.mark.shared_data
def test_audit_reports_every_part_on_real_images(
    audit, tiny_checkpoint: Path, tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    result = audit.main(["--model", str(tiny_checkpoint), "--data_dir", str(tiny_corpus), "--output_dir",
                         str(tmp_path), "--ig_per_class", "1"])  # fmt: skip
    printed = json.loads(capsys.readouterr().out)  # stdout is one JSON object
    assert printed == json.loads(json.dumps(result))
    assert set(printed["conditions"]) == {"original", "lungs_hidden", "lungs_only"}
    for values in printed["conditions"].values():
        assert 0.0 <= values["accuracy"] <= 1.0 and 0.0 <= values["macro_f1"] <= 1.0
        assert set(values["sensitivity"]) == set(values["auc"]) == set(LABEL_NAMES)
    assert printed["num_samples"] > 0 and "Lung fields found per image" in printed["region"]
    assert printed["interpretation"] and isinstance(printed["gate"]["passed"], bool)
    assert set(printed["source_probe"]["original"]) == set(LABEL_NAMES)
    assert printed["attribution"]["integrated_gradients"]["n"] == 3
    assert json.loads((tmp_path / "shortcut_audit.json").read_text()) == printed
    assert (tmp_path / "shortcut_audit.md").read_text() == printed["markdown"]
    assert "| lungs hidden |" in printed["markdown"]
    with Image.open(tmp_path / "shortcut_audit_mask.png") as image:
        image.verify()


def test_a_folder_that_is_not_a_checkpoint_is_refused(audit, tmp_path: Path):
    with pytest.raises(SystemExit, match="--model"):
        audit.main(["--model", str(tmp_path), "--data_dir", str(tmp_path)])
