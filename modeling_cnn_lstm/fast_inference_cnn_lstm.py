"""Opt-in fast CPU inference for the CNN-LSTM: `model.fast_cpu_inference()` -> a logits function.

`forward` always runs the fp32 PyTorch graph. Serving on a CPU can be faster with another runner of the same weights:
channels-last fp32, ONNX Runtime fp32 (exported in memory, nothing written to disk) or a bfloat16 channels-last copy
(only where the CPU computes bf16 natively). Which one wins depends on the CPU, the thread count and the model's
size, so `backend="auto"` measures: every candidate must agree with eager fp32, then a short timed trial keeps the
fastest only if it beats eager fp32. Measured (shipped paper model, 224 px, AMD EPYC with AVX2, 2 threads): eager
185 ms/img, channels-last 157, ONNX Runtime 147 (export 5.6 s), emulated bf16 1430; "auto" took 8 s and chose ONNX
Runtime (scripts/benchmark_inference.py).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "channels_last", "onnxruntime", "bf16")
CANDIDATES = BACKENDS[1:]  # "torch" (eager fp32) is the baseline every other candidate is compared with
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute bfloat16 natively
EMULATED_BF16 = (
    "emulated bfloat16 on this CPU (no avx512_bf16/amx_bf16 flag): the bf16 copy of the paper model measured 7-8x "
    "slower than fp32 on an AVX2 EPYC (scripts/benchmark_inference.py)"
)
FP32_TOLERANCE = 1e-3  # max |logit - eager logit|, relative to max(1, max |eager logit|): fp32 kernels reorder sums
BF16_TOLERANCE = 0.03  # max |probability - eager probability|: bf16 keeps 8 bits of mantissa
# Two identical eager copies timed by the trial (paper model, 1-2 threads, quiet 2-core EPYC) came out up to 1.5%
# apart; another process on a shared machine moves them more. A smaller win than 5% is not taken for one.
MIN_SPEEDUP = 1.05
# What fixes the best backend is the model's shape: every keyword of its config's constructor except these (values
# that change no tensor shape or operation at inference), plus the number of labels. Derived, so a new config field
# counts at once.
NOT_SHAPE_FIELDS = frozenset({"self", "kwargs", "calibration_temperature", "image_mean", "image_std", "block_dropout",
                              "head_dropout", "crop_to_lungs", "backbone_pretrained"})  # fmt: skip


def shape_fields(config) -> tuple[str, ...]:
    parameters = inspect.signature(type(config).__init__).parameters
    return (*(name for name in parameters if name not in NOT_SHAPE_FIELDS), "num_labels")


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


def cpu_model_name(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's marketing name: part of the key under which a trial's decision is reused."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


class CnnLstmLogits(nn.Module):
    """The classifier as a tensor-valued function of pixel values: what ONNX export and Captum need (both refuse a
    `ModelOutput`). Same computation as `forward` without labels."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(pixel_values))


Run = Callable[[torch.Tensor], torch.Tensor]


def _inference(module: nn.Module, prepare: Callable[[torch.Tensor], torch.Tensor]) -> Run:
    def run(pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(prepare(pixel_values)).float()

    return run


def _build_torch(reference: CnnLstmLogits) -> Run:
    return _inference(reference, lambda pixel_values: pixel_values)


def _build_channels_last(reference: CnnLstmLogits) -> Run:
    module = copy.deepcopy(reference).to(memory_format=torch.channels_last)
    return _inference(module, lambda pixel_values: pixel_values.contiguous(memory_format=torch.channels_last))


def _build_bf16(reference: CnnLstmLogits) -> Run:
    module = copy.deepcopy(reference).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    return _inference(
        module, lambda pixel_values: pixel_values.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    )


_EXPORT_LOCK = threading.Lock()  # torch.export traces through global state: one export at a time
_EXPORTER_LOGGERS = ("onnx_ir", "onnxscript")  # ~25 INFO lines per export in an app that logs INFO


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [exporter_logger.level for exporter_logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about LSTM flat weights and deprecated guards
        for exporter_logger in loggers:
            exporter_logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for exporter_logger, level in zip(loggers, levels, strict=True):
                exporter_logger.setLevel(level)


def _build_onnxruntime(reference: CnnLstmLogits) -> Run:
    try:  # imported here, when the candidate is built: loading the model never pays for it
        import onnxruntime
    except ImportError:
        raise RuntimeError("onnxruntime is not installed (pip install onnxruntime onnx onnxscript)") from None
    config = reference.model.config
    example = torch.zeros(2, config.num_channels, config.image_size, config.image_size)
    with _EXPORT_LOCK, _quiet_exporter():
        program = torch.onnx.export(
            reference,
            (example,),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamo=True,
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1)}},
            verbose=False,
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    del program

    def run(pixel_values: torch.Tensor) -> torch.Tensor:  # InferenceSession.run is thread-safe
        (logits,) = session.run(["logits"], {"pixel_values": pixel_values.contiguous().numpy()})
        return torch.from_numpy(logits)

    return run


BUILDERS: dict[str, Callable[[CnnLstmLogits], Run]] = {
    "torch": _build_torch,
    "channels_last": _build_channels_last,
    "onnxruntime": _build_onnxruntime,
    "bf16": _build_bf16,
}


def disagreement(backend: str, logits: torch.Tensor, reference: torch.Tensor) -> str | None:
    """Why `logits` do not stand in for eager fp32's `reference` logits, or None when they do."""
    if logits.shape != reference.shape:
        return f"output shape {tuple(logits.shape)} differs from eager fp32's {tuple(reference.shape)}"
    if not torch.isfinite(logits).all():
        return "non-finite logits"
    if backend == "bf16":
        probabilities, expected = logits.float().softmax(-1), reference.softmax(-1)
        difference = float((probabilities - expected).abs().max())
        if difference > BF16_TOLERANCE:
            return f"probabilities differ from eager fp32 by {difference:.3f} (more than {BF16_TOLERANCE})"
        if expected.shape[-1] > 1:  # a different top-1 counts unless eager fp32 itself is within tolerance of a tie
            top_two = expected.topk(2, dim=-1).values
            clear = (top_two[:, 0] - top_two[:, 1]) > BF16_TOLERANCE
            if bool((probabilities.argmax(-1) != expected.argmax(-1))[clear].any()):
                return "top-1 class differs from eager fp32"
        return None
    tolerance = FP32_TOLERANCE * max(1.0, float(reference.abs().max()))
    difference = float((logits.float() - reference).abs().max())
    if not difference <= tolerance:
        return f"logits differ from eager fp32 by {difference:.2e} (more than {tolerance:.1e})"
    return None


@dataclass(frozen=True)
class TrialSettings:
    """The timed trial of `backend="auto"`: batch 1, warm-up calls, then timed calls per candidate, round robin."""

    warmup: int = 1
    repeats: int = 3
    clock: Callable[[], float] = time.perf_counter


@dataclass(frozen=True)
class BackendDecision:
    backend: str
    reason: str
    timings: dict[str, float | None]  # p50 seconds per image in the trial; None: skipped, rejected or failed
    rejected: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not timed


def time_candidates(runs: dict[str, Run], pixel_values: torch.Tensor, settings: TrialSettings) -> dict[str, float]:
    """p50 seconds of each run on `pixel_values`. Round robin, so that a burst of load from another process on the
    shared CPU slows every candidate alike instead of deciding the contest."""
    for run in runs.values():
        for _ in range(settings.warmup):
            run(pixel_values)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(max(1, settings.repeats)):
        for name, run in runs.items():
            start = settings.clock()
            run(pixel_values)
            seconds[name].append(settings.clock() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def select_backend(
    timings: dict[str, float | None], rejected: dict[str, str] | None = None, min_speedup: float = MIN_SPEEDUP
) -> tuple[str, str]:
    """(backend, one-sentence reason): the fastest measured candidate if it beats eager fp32 ("torch") by at least
    `min_speedup`, else eager fp32. So the opt-in path is never slower than eager fp32 as measured here."""
    rejected = rejected or {}
    eager = timings["torch"]
    measured = {
        name: seconds for name, seconds in timings.items()
        if name != "torch" and seconds is not None and name not in rejected
    }
    if not measured:
        why = "; ".join(f"{name}: {reason}" for name, reason in rejected.items()) or "no candidates"
        return "torch", f"eager fp32, the only candidate left ({why})."
    fastest = min(measured, key=measured.get)
    speedup = eager / measured[fastest]
    if speedup < min_speedup:
        return "torch", (
            f"eager fp32 ({1000 * eager:.3g} ms/img): the fastest alternative, {fastest} "
            f"({1000 * measured[fastest]:.3g} ms/img, {speedup:.2f}x), is not at least {min_speedup:g}x faster."
        )
    return fastest, (
        f"{fastest} ran {speedup:.2f}x faster than eager fp32 ({1000 * measured[fastest]:.3g} vs "
        f"{1000 * eager:.3g} ms/img, p50 of a timed trial) and agrees with it."
    )


def decision_key(config) -> tuple:
    """What a trial's outcome depends on: the CPU, torch's thread count and version, the model's shape."""
    shape = tuple((name, repr(getattr(config, name, None))) for name in shape_fields(config))
    return cpu_model_name(), torch.get_num_threads(), torch.__version__, shape


_DECISIONS: dict[tuple, BackendDecision] = {}
_DECISIONS_LOCK = threading.Lock()


def clear_decisions() -> None:
    """Forget this process's trial results (the next `backend="auto"` runs a new trial)."""
    with _DECISIONS_LOCK:
        _DECISIONS.clear()


def _trial_inputs(config) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    size = config.image_size
    return torch.randn(2, config.num_channels, size, size, generator=generator)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _build_checked(
    name: str, reference: CnnLstmLogits, inputs: torch.Tensor, expected: torch.Tensor
) -> tuple[Run | None, str | None]:
    """(run, None) for a candidate that builds and agrees with eager fp32 on `inputs`; (None, why) otherwise."""
    try:
        run = BUILDERS[name](reference)
        why = disagreement(name, run(inputs), expected)
    except Exception as error:  # noqa: BLE001 - a candidate that cannot run here is skipped, never fatal
        why = f"failed to build or run: {_first_line(error)}"
    if why is not None:
        logger.warning("fast CPU inference: %s skipped: %s", name, why)
        return None, why
    return run, None


def _trial(reference: CnnLstmLogits, settings: TrialSettings) -> tuple[BackendDecision, dict[str, Run]]:
    inputs = _trial_inputs(reference.model.config)
    eager = BUILDERS["torch"](reference)
    expected = eager(inputs)
    runs: dict[str, Run] = {"torch": eager}
    rejected: dict[str, str] = {}
    for name in CANDIDATES[1:]:
        if name == "bf16" and not cpu_has_native_bf16():
            rejected[name] = EMULATED_BF16
            continue
        run, why = _build_checked(name, reference, inputs, expected)
        if run is None:
            rejected[name] = why
        else:
            runs[name] = run
    measured = time_candidates(runs, inputs[:1], settings)
    timings = {name: measured.get(name) for name in CANDIDATES}
    backend, reason = select_backend(timings, rejected)
    return BackendDecision(backend, reason, timings, rejected), runs


class CnnLstmFastInference:
    """`runner(pixel_values) -> logits` (fp32, on the CPU) from a snapshot of the model's weights, run by `backend`.

    Built by `CnnLstmForImageClassification.fast_cpu_inference`. The weights are copied when it is built: call that
    again after changing them (training, loading, a new calibration temperature) or torch's thread count. Safe to
    call from several threads at once (it holds no per-call state). An input the chosen backend fails on is answered
    by eager fp32, with a warning.

    Attributes: `backend` (the runner in use), `reason` (why, one sentence), `timings` (p50 seconds per image of
    each candidate in the trial; None for a skipped one, or None altogether for an explicit backend), `rejected`
    (candidate -> why it was skipped).
    """

    def __init__(self, model: nn.Module, backend: str = "auto", trial: TrialSettings | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        parameter = next(model.parameters())
        if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
            raise ValueError(
                f"fast CPU inference needs a float32 model on the CPU, got {parameter.dtype} on {parameter.device}: "
                "call model.float().cpu() first, or run the model itself on the GPU"
            )
        reference = CnnLstmLogits(copy.deepcopy(model)).eval().requires_grad_(False)
        self._reference = reference
        self._eager = BUILDERS["torch"](reference)
        self.timings: dict[str, float | None] | None = None
        self.rejected: dict[str, str] = {}
        if backend == "auto":
            self.backend, self.reason, self._run = self._choose(reference, trial or TrialSettings())
        elif backend == "torch":
            self.backend, self.reason, self._run = "torch", "eager fp32, as asked.", self._eager
        else:
            inputs = _trial_inputs(model.config)
            run, why = _build_checked(backend, reference, inputs, self._eager(inputs))
            if run is None:
                self.rejected[backend] = why
                self.backend, self.reason, self._run = "torch", f"eager fp32: {backend} was asked but {why}.", None
            else:
                self.backend, self.reason, self._run = backend, f"{backend}, as asked (agrees with eager fp32).", run
        if self._run is None:
            self._run = self._eager
        logger.info("fast CPU inference: %s (%s)", self.backend, self.reason)

    def _choose(self, reference: CnnLstmLogits, settings: TrialSettings) -> tuple[str, str, Run]:
        key = decision_key(reference.model.config)
        with _DECISIONS_LOCK:  # one trial at a time: concurrent trials would time each other
            decision = _DECISIONS.get(key)
            if decision is None:
                decision, runs = _trial(reference, settings)
                _DECISIONS[key] = decision
                self.timings, self.rejected = dict(decision.timings), dict(decision.rejected)
                return decision.backend, decision.reason, runs[decision.backend]
        self.timings, self.rejected = dict(decision.timings), dict(decision.rejected)
        reused = "trial reused (same CPU, threads, torch, model shape in this process)"
        reason = f"{decision.reason.rstrip('.')}; {reused}."
        if decision.backend == "torch":
            return "torch", reason, self._eager
        inputs = _trial_inputs(reference.model.config)
        run, why = _build_checked(decision.backend, reference, inputs, self._eager(inputs))
        if run is None:
            return "torch", f"eager fp32: the trial's choice {decision.backend} failed for this model ({why}).", None
        return decision.backend, reason, run

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.detach().to(device="cpu", dtype=torch.float32)
        self._reference.model._check_pixel_values(pixel_values)  # a wrong size: the model's own clear error
        if self._run is not self._eager:
            try:
                return self._run(pixel_values)
            except Exception as error:  # noqa: BLE001 - this input only: eager fp32 answers it (and raises if it must)
                logger.warning("fast CPU inference: %s failed, eager fp32 answers this input: %s", self.backend, error)
        return self._eager(pixel_values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, reason={self.reason!r})"


__all__ = ["BACKENDS", "CnnLstmFastInference", "CnnLstmLogits", "TrialSettings", "cpu_has_native_bf16"]
