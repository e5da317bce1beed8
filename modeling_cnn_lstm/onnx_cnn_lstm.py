"""ONNX Runtime fast path for CPU inference of the CNN-LSTM.

On a 2-core CPU, ONNX Runtime runs the paper network about 4x faster than eager PyTorch with the same fp32
numerics (see README, `scripts/benchmark_inference.py`). The model exports itself once per set of weights (cached
on disk) and uses the session only where it is exact: CPU, eval mode, no gradients, fp32, no hidden states asked.
Anything missing (onnxruntime, onnxscript) or failing falls back to PyTorch with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

try:
    import onnxruntime
except ImportError:  # pragma: no cover - the fast path is optional
    onnxruntime = None

logger = logging.getLogger(__name__)


def onnx_cache_dir() -> Path:
    """Where exported graphs are kept: `$CNN_LSTM_ONNX_CACHE`, else `$HF_HOME/cnn_lstm_onnx`."""
    if os.environ.get("CNN_LSTM_ONNX_CACHE"):
        return Path(os.environ["CNN_LSTM_ONNX_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(hf_home) / "cnn_lstm_onnx"


class _LogitsOnly(nn.Module):
    """The eager feature + head path with a tensor output, which is what the exporter needs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(pixel_values))


class CnnLstmOnnxRuntime:
    """Lazily exported ONNX Runtime session for one model; rebuilt whenever its weights change in place."""

    def __init__(self) -> None:
        self.session = None
        self.weights_version: tuple | None = None
        self.disabled_reason: str | None = None if onnxruntime is not None else "onnxruntime is not installed"

    @staticmethod
    def _weights_version(model: nn.Module) -> tuple:
        # Optimizer steps and load_state_dict bump each tensor's version counter: a cheap change detector.
        return tuple((tensor.data_ptr(), tensor._version) for tensor in model.state_dict().values())

    @staticmethod
    def _content_key(model: nn.Module) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
        digest.update(torch.__version__.encode())
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:32]

    def _export(self, model: nn.Module, path: Path) -> None:
        size = model.config.image_size
        example = torch.zeros(2, model.config.num_channels, size, size)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter chatter about LSTM flat weights and deprecated guards
            tmp_path = Path(tmp) / "model.onnx"
            torch.onnx.export(
                _LogitsOnly(model).eval(),
                (example,),
                str(tmp_path),
                input_names=["pixel_values"],
                output_names=["logits"],
                dynamo=True,
                dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1)}},
                external_data=False,
                verbose=False,
            )
            os.replace(tmp_path, path)  # atomic: a concurrent reader never sees half a file

    def _session_for(self, model: nn.Module):
        version = self._weights_version(model)
        if self.session is not None and version == self.weights_version:
            return self.session
        path = onnx_cache_dir() / f"{self._content_key(model)}.onnx"
        if not path.is_file():
            self._export(model, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.weights_version = version
        return self.session

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """Logits from ONNX Runtime, or None where the fast path does not apply (caller then runs PyTorch)."""
        if self.disabled_reason is not None:
            return None
        try:
            session = self._session_for(model)
            (logits,) = session.run(["logits"], {"pixel_values": pixel_values.detach().contiguous().numpy()})
        except Exception as error:  # noqa: BLE001 - any failure means: use PyTorch, and say so once
            self.disabled_reason = f"{type(error).__name__}: {error}"
            logger.warning("ONNX Runtime fast path disabled, using PyTorch: %s", self.disabled_reason)
            return None
        return torch.from_numpy(logits)
