"""Every test runs offline, in a throwaway Hugging Face home, on one CPU thread."""

import csv
import hashlib
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Set before anything imports huggingface_hub / datasets: both read these at import time.
_HF_HOME = tempfile.mkdtemp(prefix="cnn-lstm-tests-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_HOME, "datasets")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.hub_standin import HubStandIn  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
CXR3_DIR = REPO_ROOT.parent / "shared" / "data" / "cxr3"


@pytest.fixture(scope="session")
def cxr3_dir() -> Path:
    """The real development X-rays beside the checkout (read-only)."""
    if not (CXR3_DIR / "metadata.csv").is_file():
        pytest.fail(f"real X-rays expected at {CXR3_DIR} (../shared/data/cxr3 beside the checkout)")
    return CXR3_DIR


@pytest.fixture(scope="session")
def xray_paths(cxr3_dir: Path) -> dict[str, list[Path]]:
    """A few real X-rays per folder label, in a fixed order."""
    labels = ("covid19", "normal", "pneumonia")
    return {label: sorted((cxr3_dir / "images" / label).glob("*.jpg"))[:4] for label in labels}


# -- the model and the app (tests/model, tests/app, tests/scripts) ---------------------------------------------------
EXAMPLES_DIR = REPO_ROOT / "examples"


@pytest.fixture(scope="session")
def example_xrays() -> dict[str, list[Path]]:
    """The six public X-rays of examples/ (two per class; licences in examples/CREDITS.md) by folder label: real
    radiographs for the tests that need no more than that, so they run without ../shared."""
    xrays = {label: sorted(EXAMPLES_DIR.glob(f"{label}-*.jpg")) for label in ("covid19", "normal", "pneumonia")}
    assert all(len(paths) == 2 for paths in xrays.values()), xrays
    return xrays


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Any]:
    """`tiny_config(**overrides)`: a CnnLstmConfig with 32x32 inputs and two blocks of widths 8 and 16 (an 8x8x16
    map read as a 64-step sequence)."""
    from modeling_cnn_lstm import CnnLstmConfig

    def make(**overrides: Any) -> CnnLstmConfig:
        settings = {"block_widths": [[8], [16, 16]], "image_size": 32, "lstm_hidden_size": 12, "fc_size": 10}
        return CnnLstmConfig(**{**settings, **overrides})

    return make


@pytest.fixture(scope="session")
def seeded_model() -> Callable[..., Any]:
    """`seeded_model(config, scale=1.0)`: an eval-mode model whose weights come from a private seeded generator,
    scaled by fan-in: independent of the init code and the global RNG, so recorded numbers stay valid."""
    from modeling_cnn_lstm import CnnLstmForImageClassification

    def make(config: Any, scale: float = 1.0) -> CnnLstmForImageClassification:
        model = CnnLstmForImageClassification(config).eval()
        generator = torch.Generator().manual_seed(20200627)
        with torch.no_grad():
            for _, tensor in sorted(model.state_dict().items()):
                if tensor.is_floating_point():
                    fan_in = tensor[0].numel() if tensor.ndim > 1 else tensor.numel()
                    values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
                    tensor.copy_(values * scale / fan_in**0.5)
        return model

    return make


@pytest.fixture(scope="session")
def make_checkpoint(tiny_config: Callable[..., Any], seeded_model: Callable[..., Any]) -> Callable[..., Any]:
    """`make_checkpoint(folder, scale=2.0, **config_overrides)`: a seeded tiny model saved with its processor, a real
    checkpoint folder in a fraction of a second; returns the model. Scale 2 keeps its outputs far from uniform."""
    from modeling_cnn_lstm import CnnLstmImageProcessor

    def make(folder: Path, scale: float = 2.0, **overrides: Any) -> Any:
        config = tiny_config(**overrides)
        model = seeded_model(config, scale)
        model.save_pretrained(folder)
        CnnLstmImageProcessor.from_model_config(config).save_pretrained(folder)
        return model

    return make


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """`free_port()`: a TCP port on 127.0.0.1 that nothing listens on right now."""
    return _free_port


@pytest.fixture(scope="session")
def app_server() -> Callable[..., Any]:
    """`with app_server(model, home) as url:` runs `python app.py --model MODEL --port N` in a subprocess (offline,
    one thread, its HF home and log under `home`) and stops it afterwards. `model=None`: no --model, i.e. what
    `python app.py` serves on a fresh clone (checkpoints/cnn-lstm-cxr3)."""
    import contextlib
    import subprocess
    import time
    import urllib.request

    def stop(process: subprocess.Popen) -> None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    @contextlib.contextmanager
    def serve(model: Path | None, home: Path, timeout: float = 240) -> Iterator[str]:
        port = _free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "OMP_NUM_THREADS": "1",
               "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(home / "gradio"), "PYTHONUNBUFFERED": "1"}
        env.pop("CNN_LSTM_MODEL", None)
        model_args = [] if model is None else ["--model", str(model)]
        log_path = home / "server.log"
        with log_path.open("w") as log:
            process = subprocess.Popen([sys.executable, "app.py", *model_args, "--port", str(port)],
                                       cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"app exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"app did not answer within {timeout} s:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url + "/config", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            yield url
        finally:
            stop(process)

    return serve


# -- training and the corpus (tests/training, tests/corpus, tests/scripts) -------------------------------------------
TINY_RUN_CONFIG = REPO_ROOT / "train" / "configs" / "tiny.json"
FOLDER_LABELS = {"covid19": 0, "normal": 1, "pneumonia": 2}  # cxr3 folder labels -> class ids (README "Data")


@pytest.fixture(scope="session")
def mini_cxr3(cxr3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """72 real X-rays in the cxr3 layout: 24 per class, the class's sources taken in turn."""
    with open(cxr3_dir / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    by_label_source: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_label_source[(row["label"], row["source"])].append(row)
    chosen = []
    for label in FOLDER_LABELS:
        pools = [sorted(group, key=lambda r: r["file"]) for key, group in sorted(by_label_source.items())
                 if key[0] == label]  # fmt: skip
        taken = 0
        while taken < 24 and any(pools):
            for pool in pools:
                if pool and taken < 24:
                    chosen.append(pool.pop(0))
                    taken += 1
    destination = tmp_path_factory.mktemp("mini-cxr3")
    for row in chosen:
        (destination / row["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cxr3_dir / row["file"], destination / row["file"])
    with open(destination / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    return destination


@pytest.fixture(scope="session")
def make_dataset_dict(mini_cxr3: Path) -> Callable[..., Any]:
    """`make_dataset_dict(num_folds=2, label_names=None)`: `mini_cxr3` as a patient-grouped DatasetDict with the
    corpus builder's features: train (folds 1..k-1), validation (fold 0), test (fold -1).

    Built here rather than by the builder, so that most training tests do not depend on the builder's internals;
    `label_names` gives a corpus whose names differ from the model's (the mismatch checks).
    """
    from datasets import ClassLabel, Dataset, DatasetDict

    from train.corpus.build import corpus_features

    with open(mini_cxr3 / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    patients: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        patients[row["patient_group"]].append(row)
    # round-robin over patients sorted by label: every split and fold gets every class
    ordered = sorted(patients, key=lambda p: (FOLDER_LABELS[patients[p][0]["label"]], p))

    def make(num_folds: int = 2, label_names: list[str] | None = None) -> DatasetDict:
        assignment = {patient: index % (num_folds + 1) - 1 for index, patient in enumerate(ordered)}  # -1 = test
        features = corpus_features()
        if label_names is not None:
            features["label"] = ClassLabel(names=label_names)
        splits: dict[str, dict[str, list]] = {name: defaultdict(list) for name in ("train", "validation", "test")}
        for row in rows:
            fold = assignment[row["patient_group"]]
            split = "test" if fold < 0 else "validation" if fold == 0 else "train"
            values = {
                "image": str(mini_cxr3 / row["file"]),
                "label": FOLDER_LABELS[row["label"]],
                "patient_id": row["patient_group"],
                "source": row["source"],
                "original_finding": row["original_finding"],
                "view": row["view"],
                "sha256": hashlib.sha256((mini_cxr3 / row["file"]).read_bytes()).hexdigest(),
                "fold": fold,
            }
            for key, value in values.items():
                splits[split][key].append(value)
        return DatasetDict({name: Dataset.from_dict(dict(data), features=features) for name, data in splits.items()})

    return make


@pytest.fixture(scope="session")
def tiny_corpus(make_dataset_dict: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mini_cxr3` as a save_to_disk DatasetDict with two patient-grouped folds."""
    destination = tmp_path_factory.mktemp("tiny-corpus") / "corpus"
    make_dataset_dict().save_to_disk(str(destination))
    return destination


@pytest.fixture(scope="session")
def tiny_args() -> Callable[..., list[str]]:
    """`tiny_args(data_dir, output_dir, *extra)`: the command line of a tiny CPU run (train/configs/tiny.json)."""

    def arguments(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
        return ["--config", str(TINY_RUN_CONFIG), "--data_dir", str(data_dir), "--output_dir", str(output_dir), *extra]

    return arguments


@pytest.fixture(scope="session")
def run_main() -> Callable[[list[str]], Path | None]:
    """`run_main(argv)`: `python train/run.py ARGV` in this process (the training modules are imported once)."""
    from train.run import main

    return main


# -- every test folder -----------------------------------------------------------------------------------------------
@pytest.fixture
def hub_standin(tmp_path: Path) -> Iterator[HubStandIn]:
    """A started Hub stand-in (tests/hub_standin.py) keeping its repos under tmp_path/"hub"; fails the test if the
    stand-in itself crashed."""
    with HubStandIn(tmp_path / "hub") as hub:
        yield hub
    assert not hub.errors, "hub stand-in crashed:\n" + "\n".join(hub.errors)


@pytest.fixture(scope="session")
def load_script():
    """Import an entry-point script (`scripts/x.py`, `train/run.py`) by its path, as `python x.py` would run it."""
    import importlib.util

    def load(relative_path: str):
        path = REPO_ROOT / relative_path
        spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
        return module

    return load


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
