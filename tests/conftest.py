"""Every test runs offline, in a throwaway Hugging Face home, on one CPU thread."""

import os
import sys
import tempfile
from pathlib import Path

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
