"""PyTorch CNN-LSTM chest X-ray classifier (Islam, Islam & Asraf, Informatics in Medicine Unlocked 20, 2020).

A VGG-style convolutional trunk turns a 224x224 image into a 7x7x512 map; the 49 cells are read as a sequence by an
LSTM whose outputs at every step are flattened into a small dense classifier. `head_type="dense"` replaces the LSTM
by nothing (flatten -> dense), which is the paper's "competitive CNN".
"""

from __future__ import annotations

import contextvars
import copy
import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutput

from .configuration_cnn_lstm import CnnLstmConfig
from .fast_inference_cnn_lstm import CnnLstmFastInference, TrialSettings

try:  # transformers >= 5: init functions that skip tensors already loaded from a checkpoint.
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    from torch.nn import init

try:  # Optional: only needed for `backbone="<timm model name>"`; paper checkpoints load without timm.
    import timm
except ImportError:  # pragma: no cover - exercised where timm is absent
    timm = None

# True while `from_pretrained` builds the model: the checkpoint's weights then replace the backbone's, so a timm
# backbone is built without its pretrained weights (no download), whatever the config's `backbone_pretrained` says.
_LOADING_CHECKPOINT = contextvars.ContextVar("cnn_lstm_loading_checkpoint", default=False)


class CnnLstmConvBlock(nn.Module):
    """One VGG-style block: (conv 3x3 -> [batch norm] -> ReLU) x n, then 2x2 max-pool and dropout."""

    def __init__(self, config: CnnLstmConfig, in_channels: int, widths: list[int]) -> None:
        super().__init__()
        padding = config.kernel_size // 2
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for width in widths:
            self.convs.append(
                nn.Conv2d(in_channels, width, config.kernel_size, padding=padding, bias=not config.use_batch_norm)
            )
            self.norms.append(nn.BatchNorm2d(width) if config.use_batch_norm else nn.Identity())
            in_channels = width
        self.activation = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(config.pool_size, config.pool_size)
        self.dropout = nn.Dropout(config.block_dropout)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            hidden_state = self.activation(norm(conv(hidden_state)))
        return self.dropout(self.pool(hidden_state))


class CnnLstmEncoder(nn.Module):
    """The paper's convolutional trunk: a list of blocks given by `config.block_widths`."""

    def __init__(self, config: CnnLstmConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        in_channels = config.num_channels
        for widths in config.block_widths:
            self.blocks.append(CnnLstmConvBlock(config, in_channels, widths))
            in_channels = widths[-1]
        self.out_channels = in_channels
        self.out_size = config.feature_map_size

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns every block's output; the last one is the feature map."""
        block_outputs = []
        hidden_state = pixel_values
        for block in self.blocks:
            hidden_state = block(hidden_state)
            block_outputs.append(hidden_state)
        return tuple(block_outputs)


class CnnLstmTimmEncoder(nn.Module):
    """Any timm CNN as the trunk; its last feature map plays the part of the paper's 7x7x512 map."""

    def __init__(self, config: CnnLstmConfig, pretrained: bool = False) -> None:
        super().__init__()
        if timm is None:
            raise ImportError(f"backbone={config.backbone!r} needs timm: pip install timm")
        self.model = timm.create_model(
            config.backbone,
            pretrained=pretrained and not _LOADING_CHECKPOINT.get(),
            features_only=True,
            in_chans=config.num_channels,
        )
        self.out_channels = self.model.feature_info.channels()[-1]
        self.out_size = math.ceil(config.image_size / self.model.feature_info.reduction()[-1])

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(pixel_values))


class CnnLstmSequenceHead(nn.Module):
    """LSTM over the feature map's cells (all steps returned), flatten, dense layer, classifier."""

    def __init__(self, config: CnnLstmConfig, in_channels: int, num_steps: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            input_size=in_channels,
            hidden_size=config.lstm_hidden_size,
            num_layers=config.lstm_num_layers,
            bidirectional=config.lstm_bidirectional,
            batch_first=True,
        )
        directions = 2 if config.lstm_bidirectional else 1
        self.dropout = nn.Dropout(config.head_dropout)
        self.fc = nn.Linear(num_steps * config.lstm_hidden_size * directions, config.fc_size)
        self.activation = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(config.fc_size, config.num_labels)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        # (batch, channels, height, width) -> (batch, height * width, channels): row-major cells, as Keras' Reshape
        sequence = feature_map.flatten(2).transpose(1, 2)
        if not sequence.is_contiguous():
            sequence = sequence.contiguous()
        # (batch, steps, channels) -> (batch, steps, hidden * directions)
        sequence_output, _ = self.lstm(sequence)
        # (batch, steps, hidden * directions) -> (batch, steps * hidden * directions)
        flat = sequence_output.flatten(1)
        return self.classifier(self.activation(self.fc(self.dropout(flat))))


class CnnLstmDenseHead(nn.Module):
    """The paper's competitive CNN: flatten the feature map, dense layer, classifier."""

    def __init__(self, config: CnnLstmConfig, in_channels: int, num_steps: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.head_dropout)
        self.fc = nn.Linear(num_steps * in_channels, config.fc_size)
        self.activation = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(config.fc_size, config.num_labels)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        # (batch, channels, height, width) -> (batch, height * width * channels), cells-major like the LSTM head
        flat = feature_map.permute(0, 2, 3, 1).flatten(1)
        return self.classifier(self.activation(self.fc(self.dropout(flat))))


def own_config(config: CnnLstmConfig) -> CnnLstmConfig:
    """The model's own copy of `config` (the caller's object is never changed), saved without `backbone_pretrained`:
    pretrained timm weights are fetched once, when a new model is created, never by `from_pretrained`."""
    config = copy.deepcopy(config)
    config.backbone_pretrained = False
    return config


class CnnLstmPreTrainedModel(PreTrainedModel):
    config_class = CnnLstmConfig
    base_model_prefix = "cnn_lstm"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CnnLstmConvBlock"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, except that it never downloads timm backbone weights: the checkpoint
        holds the trained ones, and a hand-edited or foreign config.json with `backbone_pretrained: true` must not
        make loading reach the network (or fail offline)."""
        loading = _LOADING_CHECKPOINT.set(True)
        try:
            return super().from_pretrained(*args, **kwargs)
        finally:
            _LOADING_CHECKPOINT.reset(loading)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(
                f"pixel_values must have shape (batch, {', '.join(map(str, expected))}) for this checkpoint "
                f"(the flatten layer fixes the input size); got {shape}. Use the model's image processor to resize."
            )

    def _init_weights(self, module: nn.Module) -> None:
        """He init for convolutions (ReLU trunk); Keras-like Glorot/orthogonal LSTM with forget-gate bias 1."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
        elif isinstance(module, nn.LSTM):
            for name, parameter in module.named_parameters():
                if name.startswith("weight_ih"):
                    init.xavier_uniform_(parameter)
                elif name.startswith("weight_hh"):
                    init.orthogonal_(parameter)
                elif name.startswith("bias_ih") and not getattr(parameter, "_is_hf_initialized", False):
                    # gate order i, f, g, o: a forget-gate bias of 1 (Keras' unit_forget_bias); bias_hh stays 0
                    with torch.no_grad():
                        parameter.zero_()
                        parameter[module.hidden_size : 2 * module.hidden_size] = 1.0
                elif name.startswith("bias_hh"):
                    init.zeros_(parameter)


class CnnLstmModel(CnnLstmPreTrainedModel):
    """The trunk alone: pixel values -> last feature map (and every block's output)."""

    def __init__(self, config: CnnLstmConfig) -> None:
        pretrained = bool(config.backbone_pretrained)
        super().__init__(own_config(config))
        encoder = CnnLstmEncoder(self.config) if config.backbone == "paper" else None
        self.encoder = encoder or CnnLstmTimmEncoder(self.config, pretrained)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_pixel_values(pixel_values)
        block_outputs = self.encoder(pixel_values)
        feature_map = block_outputs[-1]
        # (batch, channels, height, width) -> (batch, channels): for users who want an embedding
        pooled = feature_map.mean(dim=(2, 3))
        hidden_states = block_outputs if output_hidden_states else None
        if not return_dict:
            return tuple(value for value in (feature_map, pooled, hidden_states) if value is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=feature_map, pooler_output=pooled, hidden_states=hidden_states
        )


class CnnLstmForImageClassification(CnnLstmPreTrainedModel):
    """Trunk + LSTM head (paper) or dense head (competitive CNN), with calibration_temperature-scaled logits."""

    def __init__(self, config: CnnLstmConfig) -> None:
        super().__init__(own_config(config))
        self.cnn_lstm = CnnLstmModel(config)  # reads `backbone_pretrained` from the caller's config
        self.cnn_lstm.config = self.config  # one config for the whole model
        encoder = self.cnn_lstm.encoder
        num_steps = encoder.out_size * encoder.out_size
        head_class = CnnLstmSequenceHead if config.head_type == "lstm" else CnnLstmDenseHead
        self.head = head_class(self.config, encoder.out_channels, num_steps)
        self.post_init()

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixel values -> the trunk's last feature map (batch, channels, height, width)."""
        return self.cnn_lstm(pixel_values, return_dict=True).last_hidden_state

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Feature map -> calibrated logits (divided by `config.calibration_temperature`)."""
        return self.head(feature_map) / self.config.calibration_temperature

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        outputs = self.cnn_lstm(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.forward_head(outputs.last_hidden_state)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    def fast_cpu_inference(self, backend: str = "auto", trial: TrialSettings | None = None) -> CnnLstmFastInference:
        """Opt-in faster CPU serving: `runner = model.fast_cpu_inference(); logits = runner(pixel_values)`.

        `forward` stays the exact fp32 graph; the runner is a snapshot of the current weights in one of
        `"torch"` (eager fp32), `"channels_last"` (fp32), `"onnxruntime"` (fp32, exported in memory) or `"bf16"`.
        `"auto"` checks each against eager fp32 and times them briefly (about 10 s for the paper model on 2 cores,
        once per process and model shape), keeping eager fp32 unless another is measurably faster here. See
        `CnnLstmFastInference` for its attributes (`backend`, `reason`, `timings`).
        """
        return CnnLstmFastInference(self, backend, trial)


__all__ = ["CnnLstmPreTrainedModel", "CnnLstmModel", "CnnLstmForImageClassification"]
