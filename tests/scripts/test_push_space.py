"""scripts/push_space.py against the local Hub stand-in: the Space is created with the gradio SDK, holds what the app
needs, and the pushed files run on their own (no repository on the path) and serve the shipped checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.hub_standin import HubStandIn, hub_env, run_python

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_REPORT = REPO_ROOT / "checkpoints" / "cnn-lstm-cxr3" / "report"
pytestmark = pytest.mark.slow
SPACE = "standin-user/cnn-lstm-demo"


def push(hub: HubStandIn, tmp_path: Path, *args: str) -> str:
    env = hub_env(hub.endpoint, tmp_path / "hf-home")
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "push_space.py"), "--space_id", SPACE, *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert hub.unknown_requests == [], f"requests the stand-in does not serve: {hub.unknown_requests}"
    return completed.stdout


def front_matter(readme: str) -> dict[str, str]:
    header = readme.split("---")[1]
    return dict(line.split(": ", 1) for line in header.strip().splitlines() if ": " in line)


def test_space_without_checkpoint(hub_standin, tmp_path):
    out = push(hub_standin, tmp_path, "--checkpoint", str(tmp_path / "missing"))
    assert "no checkpoint" in out and "pushed:" in out
    state = hub_standin.repo_state(SPACE, "space")
    assert state["sdk"] == "gradio"
    files = hub_standin.list_files(SPACE, "space")
    for name in ("README.md", "app.py", "requirements.txt", "cxr_app/demo.py", "cxr_common/report.py",
                 "cxr_common/atomic.py", "modeling_cnn_lstm/modeling_cnn_lstm.py", "examples/CREDITS.md"):
        assert name in files, files
    assert len([name for name in files if name.startswith("examples/") and name.endswith(".jpg")]) == 6
    assert not any(name.startswith("checkpoints/") for name in files)
    meta = front_matter(hub_standin.read_file(SPACE, "README.md", "space").decode())
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["sdk_version"].startswith("6.")
    assert "license" in meta
    assert "not for diagnosis" in hub_standin.read_file(SPACE, "README.md", "space").decode()
    requirements = hub_standin.read_file(SPACE, "requirements.txt", "space").decode()
    assert all(name in requirements for name in ("torch", "transformers", "captum", "pydicom"))


def test_space_with_checkpoint_runs_on_its_own(hub_standin, tmp_path, make_checkpoint):
    make_checkpoint(tmp_path / "final")
    shutil.copytree(SHIPPED_REPORT, tmp_path / "final" / "report")  # the model's report travels with it
    push(hub_standin, tmp_path, "--checkpoint", str(tmp_path / "final"))
    files = hub_standin.list_files(SPACE, "space")
    assert {"checkpoints/cnn-lstm-cxr3/config.json", "checkpoints/cnn-lstm-cxr3/model.safetensors",
            "checkpoints/cnn-lstm-cxr3/preprocessor_config.json"} <= set(files)
    assert {f"checkpoints/cnn-lstm-cxr3/report/{path.name}" for path in SHIPPED_REPORT.iterdir()} <= set(files)
    assert hub_standin.file_info(SPACE, "checkpoints/cnn-lstm-cxr3/model.safetensors", "space")["lfs"]
    # Pull the Space back and run it as the Space would, with this repository off the path.
    pulled = tmp_path / "pulled"
    for name in files:
        (pulled / name).parent.mkdir(parents=True, exist_ok=True)
        (pulled / name).write_bytes(hub_standin.read_file(SPACE, name, "space"))
    code = textwrap.dedent(
        f"""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()
                            and "editable" not in type(f).__module__.lower()]
        sys.path[:] = [{str(pulled)!r}] + [p for p in sys.path if p not in ("", {str(REPO_ROOT)!r})]
        import app
        import modeling_cnn_lstm
        assert modeling_cnn_lstm.__file__.startswith({str(pulled)!r}), modeling_cnn_lstm.__file__
        from cxr_app.gradio_compat import attached
        state = attached(app.demo).app
        print("STATUS", state.status)
        scores, summary = state.predict({str(pulled / "examples" / "normal-nih-a1cfe38864ff.jpg")!r})
        print("LABELS", sorted(scores))
        print("REPORT", state.report.folder, len(state.report.figures()))
        """
    )
    env = {**hub_env(hub_standin.endpoint, tmp_path / "run-home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = run_python(code, env, cwd=pulled)
    assert "STATUS Model:" in out and "checkpoints/cnn-lstm-cxr3" in out
    assert "LABELS ['COVID-19', 'Normal', 'Pneumonia']" in out
    assert f"REPORT {pulled / 'checkpoints' / 'cnn-lstm-cxr3' / 'report'} 3" in out


def test_app_serves_a_hub_model_at_a_revision(hub_standin, tmp_path, make_checkpoint):
    """`CNN_LSTM_MODEL` + `CNN_LSTM_REVISION` (what --model/--revision set): the app loads a pushed checkpoint, and
    its report/ comes from the Hub with it."""
    make_checkpoint(tmp_path / "final")
    shutil.copytree(SHIPPED_REPORT, tmp_path / "final" / "report")
    code = textwrap.dedent(
        f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("standin-user/tiny-cxr")
        info = api.upload_folder(repo_id="standin-user/tiny-cxr", folder_path={str(tmp_path / "final")!r})
        print("COMMIT", info.oid)
        """
    )
    env = hub_env(hub_standin.endpoint, tmp_path / "push-home")
    commit = run_python(code, env, cwd=tmp_path).split("COMMIT ")[1].split()[0]
    env = {**hub_env(hub_standin.endpoint, tmp_path / "app-home"), "CNN_LSTM_MODEL": "standin-user/tiny-cxr",
           "CNN_LSTM_REVISION": commit}
    example = REPO_ROOT / "examples" / "pneumonia-nih-7c0a0dd59f27.jpg"
    out = run_python(
        "from cxr_app.demo import CxrDemo\n"
        "app = CxrDemo.from_source()\n"
        "print('STATUS', app.status)\n"
        f"print('LABELS', sorted(app.predict({str(example)!r})[0]))\n"
        "print('REPORT', app.report.data['num_samples'], len(app.report.figures()))\n",
        env,
        cwd=REPO_ROOT,
    )
    assert f"STATUS Model: `standin-user/tiny-cxr at revision {commit}`" in out
    assert "LABELS ['COVID-19', 'Normal', 'Pneumonia']" in out
    assert "REPORT 209 3" in out
    assert hub_standin.unknown_requests == []


def test_dry_run_needs_no_hub(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "push_space.py"), "--dry_run", "--output_dir",
         str(tmp_path / "space"), "--checkpoint", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "space" / "app.py").is_file() and (tmp_path / "space" / "README.md").is_file()
    assert not (tmp_path / "space" / "space").exists()


def test_existing_output_dir_is_kept_unless_overwrite(tmp_path):
    """A non-empty --output_dir is refused, dry run or not, and left as it was; --overwrite replaces it whole."""
    output = tmp_path / "space"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    command = [sys.executable, str(REPO_ROOT / "scripts" / "push_space.py"), "--dry_run", "--output_dir", str(output),
               "--checkpoint", str(tmp_path / "missing")]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr, refused.stderr
    assert [path.name for path in output.iterdir()] == ["notes.txt"]
    replaced = subprocess.run([*command, "--overwrite"], capture_output=True, text=True, timeout=120)
    assert replaced.returncode == 0, replaced.stderr
    assert (output / "app.py").is_file() and not (output / "notes.txt").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".space.")]  # no staging left behind


def test_space_push_checked_before_assembly(hub_standin, tmp_path):
    """A Space in someone else's namespace is refused by the preflight before anything is assembled."""
    env = hub_env(hub_standin.endpoint, tmp_path / "hf-home")
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "push_space.py"), "--space_id", "someone-else/demo",
         "--output_dir", str(tmp_path / "space")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "push_space.py: the token belongs to standin-user, not someone-else" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "space").exists(), "the Space was assembled before the check"
    assert not hub_standin.store.repos
