"""The model: tiny-config shapes, loss, numerics against a hand-written reference, save/load, remote code, pipeline."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modeling_cnn_lstm import CnnLstmConfig, CnnLstmForImageClassification, CnnLstmImageProcessor, CnnLstmModel
from modeling_cnn_lstm import fast_inference_cnn_lstm as fast

LABELS = ["COVID-19", "Normal", "Pneumonia"]


def fixed_input(config: CnnLstmConfig, batch: int = 2) -> torch.Tensor:
    size = config.image_size
    grid = torch.arange(config.num_channels * size * size, dtype=torch.float64)
    samples = [torch.cos(grid * 0.011 * (index + 1)) * (1.0 + index) for index in range(batch)]
    return torch.stack(samples).view(batch, config.num_channels, size, size).float()


class TestConfig:
    def test_defaults_are_the_paper(self):
        config = CnnLstmConfig()
        assert config.block_widths == [[64, 64], [128, 128], [256, 256], [512, 512, 512], [512, 512, 512]]
        assert (config.kernel_size, config.pool_size, config.block_dropout) == (3, 2, 0.25)
        assert (config.head_type, config.lstm_hidden_size, config.fc_size) == ("lstm", 512, 64)
        assert (config.image_size, config.num_channels, config.feature_map_size) == (224, 3, 7)
        assert config.id2label == dict(enumerate(LABELS))
        assert config.label2id == {label: index for index, label in enumerate(LABELS)}
        assert not config.use_batch_norm

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("head_type", "gru"),
            ("block_widths", []),
            ("block_widths", [[8], []]),
            ("block_widths", [[8, -1]]),
            ("kernel_size", 4),
            ("lstm_hidden_size", 0),
            ("block_dropout", 1.0),
            ("head_dropout", -0.1),
            ("image_size", 16),  # 5 blocks of 2x2 pooling need at least 32 px
            ("calibration_temperature", 0.0),
            ("calibration_temperature", float("nan")),
            ("image_std", [0.2, 0.0, 0.2]),
            ("image_mean", [0.5]),
            ("backbone", ""),
        ],
    )
    def test_invalid_values_name_the_field(self, field, value):
        with pytest.raises(ValueError, match=field):
            CnnLstmConfig(**{field: value})

    def test_round_trip_keeps_everything(self, tmp_path, tiny_config):
        config = tiny_config(head_type="dense", use_batch_norm=True, calibration_temperature=1.7)
        config.save_pretrained(tmp_path)
        loaded = CnnLstmConfig.from_pretrained(tmp_path)
        for field in ("block_widths", "head_type", "use_batch_norm", "calibration_temperature", "id2label"):
            assert getattr(loaded, field) == getattr(config, field)
        assert loaded.label2id == config.label2id

    def test_default_statistics_are_transformers_imagenet_constants(self):
        from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        config = CnnLstmConfig()
        processor = CnnLstmImageProcessor()
        assert config.image_mean == processor.image_mean == list(IMAGENET_DEFAULT_MEAN)
        assert config.image_std == processor.image_std == list(IMAGENET_DEFAULT_STD)

    def test_old_config_with_cpu_inference_backend_loads_and_resaves_without_it(self, tmp_path, tiny_config):
        """Checkpoints saved before the fast path became opt-in carry the key; it is dropped, never saved again."""
        from transformers import AutoConfig

        tiny_config().save_pretrained(tmp_path / "old")
        saved = json.loads((tmp_path / "old" / "config.json").read_text())
        saved["cpu_inference_backend"] = "auto"
        (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
        for loaded in (CnnLstmConfig.from_pretrained(tmp_path / "old"), AutoConfig.from_pretrained(tmp_path / "old")):
            assert isinstance(loaded, CnnLstmConfig) and not hasattr(loaded, "cpu_inference_backend")
            assert loaded.block_widths == [[8], [16, 16]]
            loaded.save_pretrained(tmp_path / "new")
            assert "cpu_inference_backend" not in json.loads((tmp_path / "new" / "config.json").read_text())
        assert not hasattr(CnnLstmConfig(cpu_inference_backend="torch"), "cpu_inference_backend")


class TestTinyModel:
    def test_shapes_and_hidden_states(self, tiny_config):
        config = tiny_config()
        model = CnnLstmForImageClassification(config).eval()
        with torch.no_grad():
            output = model(fixed_input(config, batch=3), output_hidden_states=True)
        assert output.logits.shape == (3, 3)
        assert [tuple(state.shape) for state in output.hidden_states] == [(3, 8, 16, 16), (3, 16, 8, 8)]
        # LSTM head: 8x8 cells -> 64 steps of 12 units, flattened into the 10-unit dense layer
        assert model.head.fc.in_features == 64 * 12

    def test_base_model_returns_feature_map(self, tiny_config):
        config = tiny_config()
        output = CnnLstmModel(config)(fixed_input(config))
        assert output.last_hidden_state.shape == (2, 16, 8, 8)
        assert output.pooler_output.shape == (2, 16)

    def test_loss_is_cross_entropy_of_the_logits(self, tiny_config):
        config = tiny_config()
        model = CnnLstmForImageClassification(config).eval()
        labels = torch.tensor([0, 2])
        output = model(fixed_input(config), labels=labels)
        assert torch.allclose(output.loss, F.cross_entropy(output.logits, labels))
        output.loss.backward()
        assert model.head.lstm.weight_hh_l0.grad is not None
        assert model.cnn_lstm.encoder.blocks[0].convs[0].weight.grad.abs().sum() > 0

    def test_multi_label_problem_type_is_honoured(self, tiny_config):
        config = tiny_config(problem_type="multi_label_classification")
        model = CnnLstmForImageClassification(config).eval()
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        output = model(fixed_input(config), labels=labels)
        assert torch.allclose(output.loss, F.binary_cross_entropy_with_logits(output.logits, labels))

    def test_tuple_output(self, tiny_config):
        config = tiny_config()
        model = CnnLstmForImageClassification(config).eval()
        with torch.no_grad():
            loss, logits = model(fixed_input(config), labels=torch.tensor([1, 1]), return_dict=False)
        assert logits.shape == (2, 3) and loss.ndim == 0

    def test_wrong_input_size_is_a_clear_error(self, tiny_config):
        model = CnnLstmForImageClassification(tiny_config()).eval()
        with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, 32, 32\)"):
            model(torch.zeros(1, 3, 64, 64))

    def test_temperature_divides_logits(self, tiny_config, seeded_model):
        config = tiny_config()
        model = seeded_model(config)
        with torch.no_grad():
            base = model(fixed_input(config)).logits
            model.config.calibration_temperature = 2.5
            scaled = model(fixed_input(config)).logits
        assert torch.allclose(scaled, base / 2.5)

    def test_dense_head_and_batch_norm_variants(self, tiny_config):
        config = tiny_config(head_type="dense", use_batch_norm=True, lstm_bidirectional=True)
        model = CnnLstmForImageClassification(config).eval()
        assert not hasattr(model.head, "lstm")
        assert model.head.fc.in_features == 8 * 8 * 16
        assert isinstance(model.cnn_lstm.encoder.blocks[0].norms[0], torch.nn.BatchNorm2d)
        assert model(fixed_input(config)).logits.shape == (2, 3)

    def test_bidirectional_stacked_lstm(self, tiny_config):
        config = tiny_config(lstm_bidirectional=True, lstm_num_layers=2)
        model = CnnLstmForImageClassification(config).eval()
        assert model.head.fc.in_features == 64 * 12 * 2
        assert model(fixed_input(config)).logits.shape == (2, 3)

    def test_init_is_he_for_convs_and_keras_like_for_lstm(self, tiny_config):
        torch.manual_seed(0)
        model = CnnLstmForImageClassification(tiny_config(block_widths=[[64], [64]], lstm_hidden_size=64))
        conv = model.cnn_lstm.encoder.blocks[1].convs[0].weight
        expected_std = (2.0 / (64 * 9)) ** 0.5  # kaiming normal, fan_out, relu
        assert abs(conv.std().item() - expected_std) / expected_std < 0.1
        lstm = model.head.lstm
        hidden = lstm.hidden_size
        assert torch.equal(lstm.bias_ih_l0[hidden : 2 * hidden], torch.ones(hidden))  # forget gate
        assert lstm.bias_ih_l0[:hidden].abs().sum() == 0 and lstm.bias_hh_l0.abs().sum() == 0
        recurrent = lstm.weight_hh_l0.detach()  # (4 * hidden, hidden) with orthonormal columns, as Keras' (h, 4h)
        assert torch.allclose(recurrent.T @ recurrent, torch.eye(hidden), atol=1e-4)


def reference_logits(model: CnnLstmForImageClassification, pixels: torch.Tensor) -> torch.Tensor:
    """The paper network written out with functional ops and explicit LSTM gate equations."""
    hidden = pixels
    for block in model.cnn_lstm.encoder.blocks:
        for conv in block.convs:
            hidden = F.relu(F.conv2d(hidden, conv.weight, conv.bias, padding=1))
        hidden = F.max_pool2d(hidden, 2)
    batch, channels, height, width = hidden.shape
    steps = hidden.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # Keras Reshape of NHWC
    lstm = model.head.lstm
    h = torch.zeros(batch, lstm.hidden_size)
    c = torch.zeros(batch, lstm.hidden_size)
    outputs = []
    for step in range(steps.shape[1]):
        gates = steps[:, step] @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + h @ lstm.weight_hh_l0.T + lstm.bias_hh_l0
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    flat = torch.stack(outputs, dim=1).flatten(1)
    dense = F.relu(flat @ model.head.fc.weight.T + model.head.fc.bias)
    return (dense @ model.head.classifier.weight.T + model.head.classifier.bias) / model.config.calibration_temperature


class TestNumerics:
    def test_matches_hand_written_reference(self, tiny_config, seeded_model):
        config = tiny_config(calibration_temperature=1.3)
        model = seeded_model(config)
        pixels = fixed_input(config)
        with torch.no_grad():
            logits = model(pixels).logits
        assert torch.allclose(logits, reference_logits(model, pixels), atol=1e-5)

    def test_golden_logits(self, tiny_config, seeded_model):
        """Regression guard: numbers recorded from this implementation with deterministic weights."""
        config = tiny_config()
        model = seeded_model(config)
        with torch.no_grad():
            logits = model(fixed_input(config)).logits
        golden = torch.tensor(GOLDEN_LOGITS)
        assert torch.allclose(logits, golden, atol=2e-5), logits.tolist()


GOLDEN_LOGITS = [[-0.046400, -0.931481, 0.521574], [0.003989, -0.775221, 0.835207]]


def tree(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def plain_graph(model: CnnLstmForImageClassification, pixels: torch.Tensor) -> torch.Tensor:
    """The fp32 graph written out from the model's own modules (in the caller's grad mode: with and without autograd
    the LSTM takes different CPU kernels, ~1e-7 apart)."""
    feature_map = model.cnn_lstm.encoder(pixels)[-1]
    return model.head(feature_map) / model.config.calibration_temperature


class TestForwardIsThePlainGraph:
    def test_eval_cpu_forward_is_the_fp32_graph_bit_for_bit_and_writes_nothing(
        self, tmp_path, monkeypatch, tiny_config, seeded_model
    ):
        monkeypatch.chdir(tmp_path)
        model = seeded_model(tiny_config(calibration_temperature=1.3))
        pixels = fixed_input(model.config, batch=3)
        hf_home = Path(os.environ["HF_HOME"])
        before = tree(hf_home), tree(tmp_path)

        def refuse(*args, **kwargs):
            raise AssertionError("forward must not export, start ONNX Runtime or copy the model")

        monkeypatch.setattr(torch.onnx, "export", refuse)
        monkeypatch.setattr(copy, "deepcopy", refuse)  # e.g. into a bf16 or channels-last twin
        for mode in (torch.inference_mode, torch.no_grad, torch.enable_grad):
            with mode():
                logits, expected = model(pixels).logits, plain_graph(model, pixels)
                (as_tuple,) = model(pixel_values=pixels, return_dict=False)
            assert logits.dtype == torch.float32
            assert torch.equal(logits, expected) and torch.equal(as_tuple, expected), mode.__name__
        assert (tree(hf_home), tree(tmp_path)) == before


@pytest.fixture
def fresh_decisions():
    """Each test sees an empty per-process cache of trial decisions, and leaves one behind."""
    fast.clear_decisions()
    yield
    fast.clear_decisions()


def injected(timings: dict[str, float]):
    """A stand-in for the timed trial: these p50s for whichever candidates got that far."""
    return lambda runs, pixels, settings: {name: timings[name] for name in runs}


def tolerance(backend: str) -> float:
    return 3e-2 if backend == "bf16" else 1e-5


class TestFastCpuInference:
    @pytest.mark.parametrize("backend", ["torch", "channels_last", "onnxruntime", "bf16"])
    def test_explicit_backend_matches_eager(self, backend, tmp_path, monkeypatch, tiny_config, seeded_model):
        if backend == "onnxruntime":
            pytest.importorskip("onnxruntime")
        monkeypatch.chdir(tmp_path)
        hf_home = Path(os.environ["HF_HOME"])
        before = tree(hf_home), tree(tmp_path)
        model = seeded_model(tiny_config(calibration_temperature=1.3))
        pixels = fixed_input(model.config, batch=3)
        with torch.no_grad():
            eager = model(pixels).logits
        runner = model.fast_cpu_inference(backend)
        assert runner.backend == backend, runner.reason
        assert runner.timings is None and runner.rejected == {}  # no trial for an explicit choice
        logits = runner(pixels)
        assert logits.dtype == torch.float32 and logits.shape == (3, 3)
        assert torch.allclose(logits, eager, atol=tolerance(backend)), (logits - eager).abs().max()
        assert torch.equal(logits.argmax(-1), eager.argmax(-1))
        assert (tree(hf_home), tree(tmp_path)) == before  # the ONNX export stays in memory

    def test_runner_is_a_snapshot_of_the_weights(self, tiny_model):
        model = tiny_model
        pixels = fixed_input(model.config)
        runner = model.fast_cpu_inference("channels_last")
        before = runner(pixels)
        with torch.no_grad():
            model.head.classifier.bias.add_(1.0)
            model.config.calibration_temperature = 2.0
            changed = model(pixels).logits
        assert torch.equal(runner(pixels), before)  # built from the weights at call time
        assert torch.allclose(model.fast_cpu_inference("channels_last")(pixels), changed, atol=1e-5)
        assert torch.allclose(changed, (before + 1.0) / 2.0, atol=1e-5)

    def test_wrong_input_size_is_the_models_error(self, tiny_model):
        runner = tiny_model.fast_cpu_inference("torch")
        with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, 32, 32\)"):
            runner(torch.zeros(1, 3, 64, 64))

    def test_refuses_a_model_that_is_not_float32_on_the_cpu(self, tiny_model):
        model = tiny_model.to(torch.float64)
        with pytest.raises(ValueError, match="float32 model on the CPU"):
            model.fast_cpu_inference("torch")

    def test_failure_on_an_input_falls_back_to_eager_with_a_warning(self, monkeypatch, caplog, tiny_model):
        def fails_on_single_images(reference):
            run = fast.BUILDERS["torch"](reference)

            def run_or_fail(pixel_values):
                if len(pixel_values) == 1:
                    raise RuntimeError("kernel missing for batch 1")
                return run(pixel_values)

            return run_or_fail

        monkeypatch.setitem(fast.BUILDERS, "channels_last", fails_on_single_images)
        model = tiny_model
        runner = model.fast_cpu_inference("channels_last")
        assert runner.backend == "channels_last"  # its check ran on a batch of two
        single = fixed_input(model.config)[:1]
        with caplog.at_level("WARNING"):
            logits = runner(single)
        with torch.no_grad():
            assert torch.equal(logits, model(single).logits)
        assert "kernel missing for batch 1" in caplog.text and "eager fp32" in caplog.text

    def test_candidate_that_fails_to_build_is_skipped_with_its_reason(
        self, monkeypatch, caplog, fresh_decisions, tiny_model
    ):
        def broken(reference):
            raise RuntimeError("no such kernel")

        monkeypatch.setitem(fast.BUILDERS, "onnxruntime", broken)
        model = tiny_model
        with caplog.at_level("WARNING"):
            explicit = model.fast_cpu_inference("onnxruntime")
        assert explicit.backend == "torch" and "no such kernel" in explicit.reason
        assert "onnxruntime skipped" in caplog.text
        automatic = model.fast_cpu_inference("auto")
        assert "no such kernel" in automatic.rejected["onnxruntime"]
        assert automatic.timings["onnxruntime"] is None and automatic.backend != "onnxruntime"

    def test_candidate_that_disagrees_with_eager_is_rejected(self, monkeypatch, fresh_decisions, tiny_model):
        def off_by_one(reference):
            run = fast.BUILDERS["torch"](reference)
            return lambda pixel_values: run(pixel_values) + 1.0

        monkeypatch.setitem(fast.BUILDERS, "channels_last", off_by_one)
        monkeypatch.setitem(fast.BUILDERS, "onnxruntime", fast.BUILDERS["torch"])  # a fast stand-in: no export
        # the broken candidate would win the trial if it were timed at all
        monkeypatch.setattr(fast, "time_candidates", injected(
            {"torch": 1.0, "channels_last": 0.1, "onnxruntime": 0.9, "bf16": 3.0}
        ))
        model = tiny_model
        runner = model.fast_cpu_inference("auto")
        assert "differ from eager fp32" in runner.rejected["channels_last"]
        assert runner.backend == "onnxruntime" and runner.timings["channels_last"] is None
        assert model.fast_cpu_inference("channels_last").backend == "torch"
        bf16_wrong = fast.disagreement("bf16", torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]]))
        assert "probabilities differ" in bf16_wrong

    @pytest.mark.parametrize(
        ("timings", "rejected", "expected"),
        [
            ({"torch": 1.0, "channels_last": 1.2, "onnxruntime": 1.1, "bf16": None}, {}, "torch"),
            ({"torch": 1.0, "channels_last": 0.8, "onnxruntime": 0.6, "bf16": None}, {}, "onnxruntime"),
            ({"torch": 1.0, "channels_last": 0.8, "onnxruntime": 0.6, "bf16": 0.3}, {"bf16": "emulated"},
             "onnxruntime"),
            ({"torch": 1.0, "channels_last": 0.99, "onnxruntime": None, "bf16": None}, {}, "torch"),  # noise
            ({"torch": 1.0, "channels_last": None, "onnxruntime": None, "bf16": None}, {}, "torch"),
        ],
    )
    def test_selection_never_picks_a_candidate_slower_than_eager(self, timings, rejected, expected):
        backend, reason = fast.select_backend(timings, rejected)
        assert backend == expected and reason.endswith(".") and "\n" not in reason
        generator = torch.Generator().manual_seed(0)
        for _ in range(200):
            drawn = dict(zip(fast.CANDIDATES, (torch.rand(4, generator=generator) + 0.1).tolist(), strict=True))
            chosen, _ = fast.select_backend(drawn)
            assert chosen == "torch" or drawn[chosen] * fast.MIN_SPEEDUP <= drawn["torch"]
            assert drawn[chosen] == min(drawn.values()) or chosen == "torch"

    @pytest.mark.parametrize(("timings", "expected"), [
        ({"torch": 1.0, "channels_last": 0.5, "onnxruntime": 0.7, "bf16": 3.0}, "channels_last"),
        ({"torch": 1.0, "channels_last": 1.5, "onnxruntime": 2.0, "bf16": 3.0}, "torch"),
    ])
    def test_auto_builds_what_the_timed_trial_chose(self, monkeypatch, fresh_decisions, timings, expected, tiny_model):
        monkeypatch.setattr(fast, "time_candidates", injected(timings))
        monkeypatch.setitem(fast.BUILDERS, "onnxruntime", fast.BUILDERS["channels_last"])  # no export needed here
        model = tiny_model
        runner = model.fast_cpu_inference()
        assert runner.backend == expected and runner.timings["torch"] == 1.0
        assert runner.timings["channels_last"] == timings["channels_last"]
        pixels = fixed_input(model.config)
        with torch.no_grad():
            assert torch.allclose(runner(pixels), model(pixels).logits, atol=1e-5)

    def test_real_trial_on_a_tiny_model(self, fresh_decisions, tiny_model):
        model = tiny_model
        runner = model.fast_cpu_inference("auto", fast.TrialSettings(warmup=1, repeats=3))
        timings = runner.timings
        assert set(timings) == set(fast.CANDIDATES) and timings["torch"] > 0
        if runner.backend != "torch":
            assert timings[runner.backend] * fast.MIN_SPEEDUP <= timings["torch"], (runner.reason, timings)
        if not fast.cpu_has_native_bf16():
            assert "emulated bfloat16" in runner.rejected["bf16"] and timings["bf16"] is None
        if importlib.util.find_spec("onnxruntime") is not None:
            assert timings["onnxruntime"] is not None, runner.rejected  # exported in memory and timed
        pixels = fixed_input(model.config, batch=3)
        with torch.no_grad():
            assert torch.allclose(runner(pixels), model(pixels).logits, atol=tolerance(runner.backend))

    def test_trial_runs_once_per_process_for_a_cpu_threads_and_shape(
        self, monkeypatch, fresh_decisions, tiny_config, tiny_model
    ):
        trials = []

        def timed(runs, pixels, settings):
            trials.append(tuple(pixels.shape))
            return {name: {"torch": 1.0, "channels_last": 0.5, "onnxruntime": 0.8, "bf16": 3.0}[name] for name in runs}

        monkeypatch.setattr(fast, "time_candidates", timed)
        monkeypatch.setitem(fast.BUILDERS, "onnxruntime", fast.BUILDERS["torch"])  # no export needed here
        first = tiny_model.fast_cpu_inference()
        second_model = CnnLstmForImageClassification(tiny_config()).eval()  # other weights, same shape
        second = second_model.fast_cpu_inference()
        assert trials == [(1, 3, 32, 32)]
        assert second.backend == first.backend == "channels_last" and "trial reused" in second.reason
        pixels = fixed_input(second_model.config)
        with torch.no_grad():  # the decision is shared, the weights are not
            assert torch.allclose(second(pixels), second_model(pixels).logits, atol=1e-5)
        CnnLstmForImageClassification(tiny_config(image_size=64)).eval().fast_cpu_inference()
        assert trials == [(1, 3, 32, 32), (1, 3, 64, 64)]
        threads = torch.get_num_threads()
        torch.set_num_threads(threads + 1)
        try:
            tiny_model.fast_cpu_inference()
        finally:
            torch.set_num_threads(threads)
        assert len(trials) == 3

    def test_concurrent_calls_share_one_runner(self, tiny_model):
        from concurrent.futures import ThreadPoolExecutor

        model = tiny_model
        runner = model.fast_cpu_inference("onnxruntime")
        inputs = [fixed_input(model.config, batch=1 + index % 3) * (1 + index) for index in range(12)]
        with ThreadPoolExecutor(4) as pool:
            outputs = list(pool.map(runner, inputs))
        with torch.no_grad():
            for pixels, logits in zip(inputs, outputs, strict=True):
                assert torch.allclose(logits, model(pixels).logits, atol=1e-5)

    def test_cpu_model_name_reads_cpuinfo(self, tmp_path):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9999 64-Core Processor\nflags\t: fpu avx2\n")
        assert fast.cpu_model_name(cpuinfo) == "AMD EPYC 9999 64-Core Processor"
        assert fast.cpu_flags(cpuinfo) == frozenset({"fpu", "avx2"}) and not fast.cpu_has_native_bf16(
            fast.cpu_flags(cpuinfo)
        )


class TestPaperConfig:
    def test_table_2_shapes_and_parameter_counts(self):
        torch.manual_seed(0)
        model = CnnLstmForImageClassification(CnnLstmConfig()).eval()
        assert sum(p.numel() for p in model.parameters()) == 17_831_747
        dense = CnnLstmForImageClassification(CnnLstmConfig(head_type="dense"))
        assert sum(p.numel() for p in dense.parameters()) == 15_730_499
        conv_layers = [conv for block in model.cnn_lstm.encoder.blocks for conv in block.convs]
        assert len(conv_layers) == 12
        per_block = [sum(p.numel() for p in block.parameters()) for block in model.cnn_lstm.encoder.blocks]
        assert per_block == [38_720, 221_440, 885_248, 5_899_776, 7_079_424]  # the README's table
        assert sum(p.numel() for p in model.head.lstm.parameters()) == 2_101_248
        assert sum(p.numel() for p in model.head.fc.parameters()) == 1_605_696
        seen = {}
        hooks = [
            model.head.lstm.register_forward_hook(lambda m, i, o: seen.update(lstm_in=i[0].shape, lstm=o[0].shape)),
            model.head.fc.register_forward_hook(lambda m, i, o: seen.update(flatten=i[0].shape, fc=o.shape)),
        ]
        with torch.no_grad():
            output = model(torch.zeros(1, 3, 224, 224), output_hidden_states=True)
        for hook in hooks:
            hook.remove()
        assert [tuple(s.shape[1:]) for s in output.hidden_states] == [
            (64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (512, 7, 7),
        ]
        assert tuple(seen["lstm_in"]) == (1, 49, 512) and tuple(seen["lstm"]) == (1, 49, 512)
        assert tuple(seen["flatten"]) == (1, 25_088) and tuple(seen["fc"]) == (1, 64)
        assert output.logits.shape == (1, 3)


class TestTimmBackbone:
    def test_timm_trunk_feeds_the_same_head(self):
        pytest.importorskip("timm")
        config = CnnLstmConfig(backbone="resnet10t", image_size=64, lstm_hidden_size=8, fc_size=8)
        model = CnnLstmForImageClassification(config).eval()
        assert model.cnn_lstm.encoder.out_size == 2  # 64 px / reduction 32
        with torch.no_grad():
            assert model(torch.zeros(2, 3, 64, 64)).logits.shape == (2, 3)
        assert config.backbone_pretrained is False


class TestSaveLoad:
    def test_folder_contents_and_round_trip(self, tmp_path, example_xrays, make_checkpoint):
        model = make_checkpoint(tmp_path)
        names = {path.name for path in tmp_path.iterdir()}
        assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= names
        code = {"configuration_cnn_lstm.py", "modeling_cnn_lstm.py", "image_processing_cnn_lstm.py"}
        assert code | {"fast_inference_cnn_lstm.py"} <= names  # the opt-in fast path travels with the folder
        assert "cpu_inference_backend" not in json.loads((tmp_path / "config.json").read_text())
        auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForImageClassification"] == "modeling_cnn_lstm.CnnLstmForImageClassification"
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
        processor = AutoImageProcessor.from_pretrained(tmp_path)
        pixels = processor(Image.open(example_xrays["covid19"][0]))["pixel_values"]
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        with torch.no_grad():
            assert torch.allclose(loaded(pixels).logits, model(pixels).logits, atol=1e-6)

    def test_remote_code_in_a_fresh_process_without_this_repository(self, tmp_path, example_xrays, make_checkpoint):
        checkpoint = tmp_path / "checkpoint"
        model = make_checkpoint(checkpoint)
        image = example_xrays["pneumonia"][0]
        processor = CnnLstmImageProcessor.from_model_config(model.config)
        with torch.no_grad():
            expected = model(processor(Image.open(image))["pixel_values"]).logits[0].tolist()
        script = textwrap.dedent(
            f"""
            import importlib.util, json, sys
            sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                                and "editable" not in repr(f).lower()]
            sys.path[:] = [p for p in sys.path if p not in ("", {str(Path.cwd())!r})]
            assert importlib.util.find_spec("modeling_cnn_lstm") is None, "the repository leaked into sys.path"
            import torch
            from PIL import Image
            from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
            folder = {str(checkpoint)!r}
            model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
            processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
            pixels = processor(Image.open({str(image)!r}))["pixel_values"]
            with torch.no_grad():
                logits = model(pixels).logits[0].tolist()
            runner = model.fast_cpu_inference("channels_last")  # the opt-in path, from the folder's own code
            fast = runner(pixels)[0].tolist()
            classify = pipeline("image-classification", model=folder, trust_remote_code=True)
            result = classify(Image.open({str(image)!r}))
            print(json.dumps({{"module": type(model).__module__, "logits": logits, "pipeline": result,
                              "fast": fast, "fast_module": type(runner).__module__}}))
            """
        )
        env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
        completed = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        assert result["module"].startswith("transformers_modules"), result["module"]
        assert result["logits"] == pytest.approx(expected, abs=1e-5)
        assert result["fast"] == pytest.approx(expected, abs=1e-5)
        assert result["fast_module"].startswith("transformers_modules"), result["fast_module"]
        assert sorted(entry["label"] for entry in result["pipeline"]) == sorted(LABELS)
        assert sum(entry["score"] for entry in result["pipeline"]) == pytest.approx(1.0, abs=1e-5)
        probabilities = torch.tensor(expected).softmax(-1)
        top = result["pipeline"][0]
        assert top["label"] == LABELS[int(probabilities.argmax())]
        assert top["score"] == pytest.approx(float(probabilities.max()), abs=1e-5)  # pipeline runs forward: fp32


def test_pipeline_on_real_xrays(tmp_path, example_xrays, make_checkpoint):
    from transformers import pipeline

    make_checkpoint(tmp_path / "checkpoint")
    classify = pipeline("image-classification", model=str(tmp_path / "checkpoint"), trust_remote_code=True)
    images = [Image.open(paths[0]) for paths in example_xrays.values()]
    for result in classify(images):
        assert sorted(entry["label"] for entry in result) == sorted(LABELS)
        assert sum(entry["score"] for entry in result) == pytest.approx(1.0, abs=1e-5)


def test_pipeline_keeps_sixteen_bit_range_given_an_array(tmp_path, example_xrays, make_checkpoint):
    """The README's advice: a 16-bit array through pipeline matches the 8-bit picture (a path would saturate)."""
    import numpy as np
    from transformers import pipeline

    make_checkpoint(tmp_path / "checkpoint")
    classify = pipeline("image-classification", model=str(tmp_path / "checkpoint"), trust_remote_code=True)
    eight = np.asarray(Image.open(example_xrays["normal"][1]))
    sixteen = eight.astype(np.uint16) * 257
    scores = {entry["label"]: entry["score"] for entry in classify(sixteen)}
    expected = {entry["label"]: entry["score"] for entry in classify(eight)}
    assert scores == pytest.approx(expected, abs=1e-5)


def test_grayscale_config_and_processor_share_their_normalisation():
    """num_channels=1: the config no longer raises, and its processor gets the same statistics (the average of
    ImageNet's three, not the red channel's)."""
    config = CnnLstmConfig(num_channels=1, block_widths=[[8], [16]], image_size=32, lstm_hidden_size=8, fc_size=8)
    mean, std = config.image_mean, config.image_std
    assert len(mean) == len(std) == 1 and mean[0] == pytest.approx((0.485 + 0.456 + 0.406) / 3)
    for processor in (CnnLstmImageProcessor(num_channels=1), CnnLstmImageProcessor.from_model_config(config)):
        assert processor.image_mean == mean and processor.image_std == std
    assert CnnLstmImageProcessor().image_mean == CnnLstmConfig().image_mean  # 3 channels: ImageNet's own


def test_the_model_never_changes_its_callers_config():
    config = CnnLstmConfig(backbone="resnet18", backbone_pretrained=True, image_size=64)
    before = config.to_dict()
    with fast_timm_without_download():
        model = CnnLstmForImageClassification(config)
    assert config.to_dict() == before and config.backbone_pretrained is True  # the caller's object is untouched
    assert model.config is not config and model.config.backbone_pretrained is False  # what gets saved
    assert model.cnn_lstm.config is model.config  # one config inside the model


def fast_timm_without_download():
    """timm.create_model with pretrained=True would download; record the flag instead."""
    import contextlib
    from unittest import mock

    import timm

    real = timm.create_model
    calls = []

    def create(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        return real(name, pretrained=False, **kwargs)

    @contextlib.contextmanager
    def patched():
        with mock.patch("modeling_cnn_lstm.modeling_cnn_lstm.timm.create_model", create):
            yield calls
        assert calls == [True], calls  # a new model still fetches the pretrained weights it was asked for

    return patched()


def test_trial_key_follows_every_config_field():
    """The fast path's trial is reused only for a model of the same shape; the shape is every constructor field of
    the config (bar the ones that change no operation), so a new field counts without a list to update."""
    import inspect

    fields = set(fast.shape_fields(CnnLstmConfig()))
    constructor = set(inspect.signature(CnnLstmConfig.__init__).parameters) - {"self", "kwargs"}
    assert fields == (constructor - fast.NOT_SHAPE_FIELDS) | {"num_labels"}
    assert {"backbone", "kernel_size", "pool_size", "head_type", "image_size"} <= fields
    assert fast.decision_key(CnnLstmConfig(kernel_size=5)) != fast.decision_key(CnnLstmConfig())
    assert fast.decision_key(CnnLstmConfig(block_dropout=0.5)) == fast.decision_key(CnnLstmConfig())
