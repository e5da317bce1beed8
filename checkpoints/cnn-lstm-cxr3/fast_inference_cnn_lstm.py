"""Fast CPU inference for the CNN-LSTM: a bfloat16 copy of the weights, or an ONNX Runtime export.

Eager fp32 PyTorch takes ~0.3 s per 224x224 image per core. On CPUs with native bfloat16 (AVX512-BF16/AMX) a
bf16 channels-last copy of the model runs ~2x faster; elsewhere ONNX Runtime runs the exact fp32 graph ~1.3x faster
(README, `scripts/benchmark_inference.py`). The model uses either only where it is safe: CPU, eval mode, no
gradients, fp32 weights, no hidden states asked, no forward hooks. The copy or session is rebuilt whenever the
weights change (in place or through `.data`), the temperature changes or torch's thread count changes; any failure
falls back to PyTorch with a warning.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

try:
    import onnxruntime
except ImportError:  # pragma: no cover - the ONNX path is optional
    onnxruntime = None

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "bf16", "onnxruntime", "torch")


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute bfloat16 natively


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (empty where /proc/cpuinfo is not readable)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16 in its flags).

    Not `torch.ops.mkldnn._is_mkldnn_bf16_supported()`: that is also true on AVX-512 CPUs where oneDNN emulates
    bf16, which makes bf16 2-3x SLOWER than fp32 there (README, "Training on a CPU"). Unknown flags -> False.
    """
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def resolve_backend(backend: str) -> str:
    """`auto` -> `bf16` on CPUs with native bfloat16, else `onnxruntime` when installed, else `torch`."""
    if backend != "auto":
        return backend
    if cpu_has_native_bf16():
        return "bf16"
    return "onnxruntime" if onnxruntime is not None else "torch"


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


class CnnLstmFastInference:
    """Per-model cache of the fast runner (bf16 copy or ONNX session), keyed by what would make it stale."""

    def __init__(self) -> None:
        self.runner = None
        self.runner_key: tuple | None = None
        self.disabled: dict[str, str] = {} if onnxruntime is not None else {"onnxruntime": "not installed"}
        self._lock = threading.Lock()  # concurrent requests (the app) share one model

    def __deepcopy__(self, memo: dict) -> CnnLstmFastInference:
        return CnnLstmFastInference()  # a copied model builds its own runner; never copy the old one

    @staticmethod
    def _weights_fingerprint(model: nn.Module) -> tuple:
        """Storage and sum of every tensor: catches optimizer steps, load_state_dict and `.data` writes alike.

        (Version counters alone miss writes through `.data`.) About 3 ms for the paper model, 2% of a forward.
        """
        tensors = list(model.state_dict().values())
        with torch.no_grad():
            sums = torch.stack([tensor.detach().float().sum() for tensor in tensors]).tolist()
        return tuple(tensor.data_ptr() for tensor in tensors), tuple(sums)

    def logits(self, model: nn.Module, pixel_values: torch.Tensor, backend: str) -> torch.Tensor | None:
        """Logits from the fast runner, or None where it does not apply (the caller then runs PyTorch fp32)."""
        if backend == "torch" or backend in self.disabled:
            return None
        key = (
            backend,
            self._weights_fingerprint(model),
            model.config.calibration_temperature,  # baked into the ONNX graph
            max(1, torch.get_num_threads()),
        )
        with self._lock:
            if self.runner is None or key != self.runner_key:
                self.runner = None  # free the stale copy before building the next
                try:
                    if backend == "bf16":
                        self.runner = _build_bf16_runner(model)
                    else:
                        self.runner = _build_onnx_runner(model, key[-1])
                except Exception as error:  # noqa: BLE001 - cannot build here: use PyTorch from now on, say so once
                    self.disabled[backend] = f"{type(error).__name__}: {error}"
                    self.runner_key = None
                    logger.warning("%s fast path disabled, using PyTorch fp32: %s", backend, self.disabled[backend])
                    return None
                self.runner_key = key
            runner = self.runner
        try:
            return runner(pixel_values)
        except Exception as error:  # noqa: BLE001 - this input only: PyTorch answers it (and raises if it must)
            logger.warning("%s fast path failed on this input, using PyTorch fp32: %s", backend, error)
            return None


def _build_bf16_runner(model: nn.Module):
    shadow = copy.deepcopy(model)
    shadow.config.cpu_inference_backend = "torch"  # the copy itself runs plain PyTorch
    shadow = shadow.to(dtype=torch.bfloat16, memory_format=torch.channels_last).eval()

    def run(pixel_values: torch.Tensor) -> torch.Tensor:
        inputs = pixel_values.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        return shadow(pixel_values=inputs).logits.float()

    return run


def _content_key(model: nn.Module) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(torch.__version__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _export_onnx(model: nn.Module, path: Path) -> None:
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


def _build_onnx_runner(model: nn.Module, num_threads: int):
    path = onnx_cache_dir() / f"{_content_key(model)}.onnx"
    if not path.is_file():
        _export_onnx(model, path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(pixel_values: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run(["logits"], {"pixel_values": pixel_values.detach().contiguous().numpy()})
        return torch.from_numpy(logits)

    return run
