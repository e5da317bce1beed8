"""The model: tiny-config shapes, loss, numerics against a hand-written reference, save/load, remote code, pipeline."""

from __future__ import annotations

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
from tests.model_testkit import save_tiny_checkpoint, seeded_model, tiny_config

LABELS = ["COVID-19", "Normal", "Pneumonia"]


def deterministic_model(config: CnnLstmConfig) -> CnnLstmForImageClassification:
    return seeded_model(config)


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
            ("cpu_inference_backend", "tensorrt"),
            ("backbone", ""),
        ],
    )
    def test_invalid_values_name_the_field(self, field, value):
        with pytest.raises(ValueError, match=field):
            CnnLstmConfig(**{field: value})

    def test_round_trip_keeps_everything(self, tmp_path):
        config = tiny_config(head_type="dense", use_batch_norm=True, calibration_temperature=1.7)
        config.save_pretrained(tmp_path)
        loaded = CnnLstmConfig.from_pretrained(tmp_path)
        for field in ("block_widths", "head_type", "use_batch_norm", "calibration_temperature", "id2label"):
            assert getattr(loaded, field) == getattr(config, field)
        assert loaded.label2id == config.label2id


class TestTinyModel:
    def test_shapes_and_hidden_states(self):
        config = tiny_config()
        model = CnnLstmForImageClassification(config).eval()
        with torch.enable_grad():
            output = model(fixed_input(config, batch=3), output_hidden_states=True)
        assert output.logits.shape == (3, 3)
        assert [tuple(state.shape) for state in output.hidden_states] == [(3, 8, 16, 16), (3, 16, 8, 8)]
        # LSTM head: 8x8 cells -> 64 steps of 12 units, flattened into the 10-unit dense layer
        assert model.head.fc.in_features == 64 * 12

    def test_base_model_returns_feature_map(self):
        config = tiny_config()
        output = CnnLstmModel(config)(fixed_input(config))
        assert output.last_hidden_state.shape == (2, 16, 8, 8)
        assert output.pooler_output.shape == (2, 16)

    def test_loss_is_cross_entropy_of_the_logits(self):
        config = tiny_config()
        model = CnnLstmForImageClassification(config).eval()
        labels = torch.tensor([0, 2])
        output = model(fixed_input(config), labels=labels)
        assert torch.allclose(output.loss, F.cross_entropy(output.logits, labels))
        output.loss.backward()
        assert model.head.lstm.weight_hh_l0.grad is not None
        assert model.cnn_lstm.encoder.blocks[0].convs[0].weight.grad.abs().sum() > 0

    def test_multi_label_problem_type_is_honoured(self):
        config = tiny_config(problem_type="multi_label_classification")
        model = CnnLstmForImageClassification(config).eval()
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        output = model(fixed_input(config), labels=labels)
        assert torch.allclose(output.loss, F.binary_cross_entropy_with_logits(output.logits, labels))

    def test_tuple_output(self):
        config = tiny_config()
        model = CnnLstmForImageClassification(config).eval()
        with torch.enable_grad():
            loss, logits = model(fixed_input(config), labels=torch.tensor([1, 1]), return_dict=False)
        assert logits.shape == (2, 3) and loss.ndim == 0

    def test_wrong_input_size_is_a_clear_error(self):
        model = CnnLstmForImageClassification(tiny_config()).eval()
        with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, 32, 32\)"):
            model(torch.zeros(1, 3, 64, 64))

    def test_temperature_divides_logits(self):
        config = tiny_config()
        model = deterministic_model(config)
        with torch.enable_grad():
            base = model(fixed_input(config)).logits
            model.config.calibration_temperature = 2.5
            scaled = model(fixed_input(config)).logits
        assert torch.allclose(scaled, base / 2.5)

    def test_dense_head_and_batch_norm_variants(self):
        config = tiny_config(head_type="dense", use_batch_norm=True, lstm_bidirectional=True)
        model = CnnLstmForImageClassification(config).eval()
        assert not hasattr(model.head, "lstm")
        assert model.head.fc.in_features == 8 * 8 * 16
        assert isinstance(model.cnn_lstm.encoder.blocks[0].norms[0], torch.nn.BatchNorm2d)
        assert model(fixed_input(config)).logits.shape == (2, 3)

    def test_bidirectional_stacked_lstm(self):
        config = tiny_config(lstm_bidirectional=True, lstm_num_layers=2)
        model = CnnLstmForImageClassification(config).eval()
        assert model.head.fc.in_features == 64 * 12 * 2
        assert model(fixed_input(config)).logits.shape == (2, 3)

    def test_init_is_he_for_convs_and_keras_like_for_lstm(self):
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
    def test_matches_hand_written_reference(self):
        config = tiny_config(calibration_temperature=1.3)
        model = deterministic_model(config)
        pixels = fixed_input(config)
        with torch.enable_grad():  # PyTorch path (the ONNX fast path only runs without gradients)
            logits = model(pixels).logits
        assert torch.allclose(logits, reference_logits(model, pixels), atol=1e-5)

    def test_golden_logits(self):
        """Regression guard: numbers recorded from this implementation with deterministic weights."""
        config = tiny_config()
        model = deterministic_model(config)
        with torch.enable_grad():
            logits = model(fixed_input(config)).logits.detach()
        golden = torch.tensor(GOLDEN_LOGITS)
        assert torch.allclose(logits, golden, atol=2e-5), logits.tolist()


GOLDEN_LOGITS = [[-0.046400, -0.931481, 0.521574], [0.003989, -0.775221, 0.835207]]


class TestFastInference:
    @pytest.mark.parametrize(("backend", "tolerance"), [("onnxruntime", 1e-5), ("bf16", 3e-2)])
    def test_matches_pytorch_and_runs_only_without_grad(self, tmp_path, monkeypatch, backend, tolerance):
        monkeypatch.setenv("CNN_LSTM_ONNX_CACHE", str(tmp_path / "onnx"))
        config = tiny_config(cpu_inference_backend=backend)
        model = deterministic_model(config)
        pixels = fixed_input(config, batch=3)
        with torch.enable_grad():
            eager = model(pixels).logits.detach()
        assert model._fast_inference.runner is None, "with gradients the model must run PyTorch fp32"
        with torch.no_grad():
            fast = model(pixels).logits
        assert model._fast_inference.runner is not None, model._fast_inference.disabled
        assert fast.dtype == torch.float32 and torch.allclose(fast, eager, atol=tolerance)
        assert torch.equal(fast.argmax(-1), eager.argmax(-1))
        assert bool(list((tmp_path / "onnx").glob("*.onnx"))) == (backend == "onnxruntime")
        # weights changed in place or a new temperature -> the runner is rebuilt, never stale
        with torch.no_grad():
            model.head.classifier.bias.add_(1.0)
            assert torch.allclose(model(pixels).logits, eager + 1.0, atol=tolerance)
            model.config.calibration_temperature = 2.0
            assert torch.allclose(model(pixels).logits, (eager + 1.0) / 2.0, atol=tolerance)

    def test_writes_through_data_hooks_and_hidden_states_are_honoured(self):
        model = deterministic_model(tiny_config(cpu_inference_backend="bf16"))
        pixels = fixed_input(model.config)
        with torch.no_grad():
            before = model(pixels).logits
            model.head.classifier.bias.data.add_(5.0)  # bypasses version counters
            assert torch.allclose(model(pixels).logits, before + 5.0, atol=3e-2)
        calls = []
        handle = model.head.fc.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
        with torch.no_grad():
            model(pixels)
        handle.remove()
        assert calls == [(2, 10)], "a hooked model must run itself, not its fast copy"
        model.config.output_hidden_states = True
        with torch.no_grad():
            assert len(model(pixels).hidden_states) == 2

    def test_torch_backend_and_training_mode_never_use_a_runner(self, tmp_path, monkeypatch):
        monkeypatch.setenv("CNN_LSTM_ONNX_CACHE", str(tmp_path / "onnx"))
        model = CnnLstmForImageClassification(tiny_config(cpu_inference_backend="torch")).eval()
        with torch.no_grad():
            model(fixed_input(model.config))
        model.config.cpu_inference_backend = "auto"
        with torch.no_grad():
            model.train()(fixed_input(model.config))
        assert model._fast_inference.runner is None and not (tmp_path / "onnx").exists()

    def test_auto_picks_bf16_only_on_native_bf16_cpus(self):
        from modeling_cnn_lstm.fast_inference_cnn_lstm import cpu_has_native_bf16, resolve_backend

        assert resolve_backend("auto") == ("bf16" if cpu_has_native_bf16() else "onnxruntime")
        assert resolve_backend("torch") == "torch"

    def test_copy_of_a_model_builds_its_own_runner(self):
        import copy

        model = deterministic_model(tiny_config(cpu_inference_backend="bf16"))
        with torch.no_grad():
            model(fixed_input(model.config))
        clone = copy.deepcopy(model)
        assert clone._fast_inference.runner is None and model._fast_inference.runner is not None


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
        with torch.enable_grad():
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
        with torch.enable_grad():
            assert model(torch.zeros(2, 3, 64, 64)).logits.shape == (2, 3)
        assert config.backbone_pretrained is False


class TestSaveLoad:
    def test_folder_contents_and_round_trip(self, tmp_path, xray_paths):
        model = save_tiny_checkpoint(tmp_path)
        names = {path.name for path in tmp_path.iterdir()}
        assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= names
        assert {"configuration_cnn_lstm.py", "modeling_cnn_lstm.py", "image_processing_cnn_lstm.py"} <= names
        auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForImageClassification"] == "modeling_cnn_lstm.CnnLstmForImageClassification"
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
        processor = AutoImageProcessor.from_pretrained(tmp_path)
        pixels = processor(Image.open(xray_paths["covid19"][0]))["pixel_values"]
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        with torch.enable_grad():
            assert torch.allclose(loaded(pixels).logits, model(pixels).logits, atol=1e-6)

    def test_remote_code_in_a_fresh_process_without_this_repository(self, tmp_path, xray_paths):
        checkpoint = tmp_path / "checkpoint"
        model = save_tiny_checkpoint(checkpoint)
        image = xray_paths["pneumonia"][0]
        processor = CnnLstmImageProcessor.from_model_config(model.config)
        with torch.enable_grad():
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
            with torch.enable_grad():
                logits = model(processor(Image.open({str(image)!r}))["pixel_values"]).logits[0].tolist()
            classify = pipeline("image-classification", model=folder, trust_remote_code=True)
            result = classify(Image.open({str(image)!r}))
            print(json.dumps({{"module": type(model).__module__, "logits": logits, "pipeline": result}}))
            """
        )
        env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "CNN_LSTM_ONNX_CACHE": str(tmp_path / "onnx")}
        completed = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        assert result["module"].startswith("transformers_modules"), result["module"]
        assert result["logits"] == pytest.approx(expected, abs=1e-5)
        assert sorted(entry["label"] for entry in result["pipeline"]) == sorted(LABELS)
        assert sum(entry["score"] for entry in result["pipeline"]) == pytest.approx(1.0, abs=1e-5)
        probabilities = torch.tensor(expected).softmax(-1)
        top = result["pipeline"][0]
        assert top["label"] == LABELS[int(probabilities.argmax())]
        # the pipeline runs the CPU fast path (bf16 where native): same top-1, scores within bf16 precision
        assert top["score"] == pytest.approx(float(probabilities.max()), abs=1e-2)


def test_pipeline_on_real_xrays(tmp_path, xray_paths, monkeypatch):
    monkeypatch.setenv("CNN_LSTM_ONNX_CACHE", str(tmp_path / "onnx"))
    from transformers import pipeline

    save_tiny_checkpoint(tmp_path / "checkpoint")
    classify = pipeline("image-classification", model=str(tmp_path / "checkpoint"), trust_remote_code=True)
    images = [Image.open(paths[0]) for paths in xray_paths.values()]
    for result in classify(images):
        assert sorted(entry["label"] for entry in result) == sorted(LABELS)
        assert sum(entry["score"] for entry in result) == pytest.approx(1.0, abs=1e-5)


def test_pipeline_keeps_sixteen_bit_range_given_an_array(tmp_path, xray_paths, monkeypatch):
    """The README's advice: a 16-bit array through pipeline matches the 8-bit picture (a path would saturate)."""
    import numpy as np
    from transformers import pipeline

    monkeypatch.setenv("CNN_LSTM_ONNX_CACHE", str(tmp_path / "onnx"))
    save_tiny_checkpoint(tmp_path / "checkpoint", cpu_inference_backend="torch")
    classify = pipeline("image-classification", model=str(tmp_path / "checkpoint"), trust_remote_code=True)
    eight = np.asarray(Image.open(xray_paths["normal"][1]))
    sixteen = eight.astype(np.uint16) * 257
    scores = {entry["label"]: entry["score"] for entry in classify(sixteen)}
    expected = {entry["label"]: entry["score"] for entry in classify(eight)}
    assert scores == pytest.approx(expected, abs=1e-5)
