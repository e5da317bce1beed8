"""Configuration of the CNN-LSTM chest X-ray classifier (Islam, Islam & Asraf, 2020)."""

from __future__ import annotations

import math
from typing import Any

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

try:  # transformers >= 5 spells it PreTrainedConfig; older releases only PretrainedConfig.
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - exercised only on old transformers
    from transformers import PretrainedConfig as PreTrainedConfig

# The paper's trunk (Table 2): 12 3x3 convolutions in 5 VGG-style blocks. Block 3 has two convolutions,
# not VGG16's three, which is what brings the network to ~17.8 M parameters.
PAPER_BLOCK_WIDTHS: list[list[int]] = [[64, 64], [128, 128], [256, 256], [512, 512, 512], [512, 512, 512]]
DEFAULT_ID2LABEL: dict[int, str] = {0: "COVID-19", 1: "Normal", 2: "Pneumonia"}
HEAD_TYPES = ("lstm", "dense")
# Keys that older versions saved and that are no longer hyperparameters: dropped on load, never saved again.
REMOVED_KEYS = ("cpu_inference_backend",)  # how to run on a CPU is the caller's choice: model.fast_cpu_inference()


def default_normalisation(num_channels: int) -> tuple[list[float], list[float]]:
    """ImageNet's per-channel mean and std for 3 channels; for any other count (1: grayscale) the average of its
    three, once per channel. The config and the image processor both default to this."""
    if num_channels == 3:
        return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    mean, std = sum(IMAGENET_DEFAULT_MEAN) / 3, sum(IMAGENET_DEFAULT_STD) / 3
    return [mean] * num_channels, [std] * num_channels


class CnnLstmConfig(PreTrainedConfig):
    r"""
    Configuration of [`CnnLstmModel`] / [`CnnLstmForImageClassification`].

    The defaults reproduce the paper's network: 12 conv layers in 5 blocks, 2x2 max-pool and 25% dropout after each
    block, the 7x7x512 map read as a 49-step sequence by an LSTM with 512 units returning all steps, flatten
    (25,088), a 64-unit dense layer and a 3-way output. `head_type="dense"` gives the paper's "competitive CNN".

    Args:
        backbone (`str`, *optional*, defaults to `"paper"`):
            `"paper"` for the plain-torch VGG-style trunk described by `block_widths`, or the name of a timm model
            (built with `features_only=True`; its last feature map feeds the same head).
        backbone_pretrained (`bool`, *optional*, defaults to `False`):
            Load timm's pretrained weights when the model is *created* from this config. Never used at load time:
            `from_pretrained` always reads the checkpoint's own weights.
        block_widths (`list[list[int]]`, *optional*):
            Output channels of each conv layer, grouped by block. Defaults to the paper's trunk.
        kernel_size (`int`, *optional*, defaults to 3): Convolution kernel size (stride 1, "same" padding).
        pool_size (`int`, *optional*, defaults to 2): Max-pool window and stride after each block.
        block_dropout (`float`, *optional*, defaults to 0.25): Dropout after each block's pool.
        use_batch_norm (`bool`, *optional*, defaults to `False`):
            Batch norm after every convolution. The paper does not have it; the authors' code has one per block.
        head_type (`str`, *optional*, defaults to `"lstm"`): `"lstm"` (paper) or `"dense"` (competitive CNN).
        lstm_hidden_size (`int`, *optional*, defaults to 512): LSTM units per direction.
        lstm_num_layers (`int`, *optional*, defaults to 1): Stacked LSTM layers.
        lstm_bidirectional (`bool`, *optional*, defaults to `False`): Run the LSTM in both directions.
        fc_size (`int`, *optional*, defaults to 64): Width of the dense layer before the classifier.
        head_dropout (`float`, *optional*, defaults to 0.0): Dropout before the dense layer (not in the paper).
        num_channels (`int`, *optional*, defaults to 3): Input channels.
        image_size (`int`, *optional*, defaults to 224): Input height and width. The flatten layer fixes it.
        calibration_temperature (`float`, *optional*, defaults to 1.0):
            Temperature-scaling calibration: the reported logits are divided by it (argmax is unchanged).
        image_mean, image_std (`list[float]`, *optional*): Normalization statistics, copied into the processor.
            Default: ImageNet's, so that timm backbones with pretrained weights work unchanged.
        crop_to_lungs (`bool`, *optional*, defaults to `False`):
            The processor crops each image to its lung fields' bounding box (plus a 5% margin) before the resize,
            so labels, markers and borders far from the lungs never reach the model. Copied into the processor;
            `False` (the default, and every older checkpoint) is the paper's whole-image input.
    """

    model_type = "cnn_lstm"

    def __init__(
        self,
        backbone: str = "paper",
        backbone_pretrained: bool = False,
        block_widths: list[list[int]] | None = None,
        kernel_size: int = 3,
        pool_size: int = 2,
        block_dropout: float = 0.25,
        use_batch_norm: bool = False,
        head_type: str = "lstm",
        lstm_hidden_size: int = 512,
        lstm_num_layers: int = 1,
        lstm_bidirectional: bool = False,
        fc_size: int = 64,
        head_dropout: float = 0.0,
        num_channels: int = 3,
        image_size: int = 224,
        calibration_temperature: float = 1.0,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        crop_to_lungs: bool = False,
        **kwargs: Any,
    ) -> None:
        for key in REMOVED_KEYS:  # PreTrainedConfig would keep an unknown key as an attribute and save it again
            kwargs.pop(key, None)
        if "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = dict(DEFAULT_ID2LABEL)
        self.backbone = backbone
        self.backbone_pretrained = backbone_pretrained
        self.block_widths = [list(block) for block in (PAPER_BLOCK_WIDTHS if block_widths is None else block_widths)]
        self.kernel_size = kernel_size
        self.pool_size = pool_size
        self.block_dropout = block_dropout
        self.use_batch_norm = use_batch_norm
        self.head_type = head_type
        self.lstm_hidden_size = lstm_hidden_size
        self.lstm_num_layers = lstm_num_layers
        self.lstm_bidirectional = lstm_bidirectional
        self.fc_size = fc_size
        self.head_dropout = head_dropout
        self.num_channels = num_channels
        self.image_size = image_size
        self.calibration_temperature = calibration_temperature
        default_mean, default_std = default_normalisation(num_channels)
        self.image_mean = list(image_mean) if image_mean is not None else default_mean
        self.image_std = list(image_std) if image_std is not None else default_std
        self.crop_to_lungs = crop_to_lungs
        self._validate()
        super().__init__(**kwargs)
        if self.id2label is not None and not self.label2id:
            # transformers 5 derives label2id only from num_labels; pipelines and datasets want both directions.
            self.label2id = {label: int(index) for index, label in self.id2label.items()}

    def _validate(self) -> None:
        """Fail at construction, naming the field, rather than with a shape error deep in the forward pass."""

        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CnnLstmConfig.{name} must be a positive integer, got {value!r}")

        def fraction(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"CnnLstmConfig.{name} must be a float in [0, 1), got {value!r}")

        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"CnnLstmConfig.backbone must be 'paper' or a timm model name, got {self.backbone!r}")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"CnnLstmConfig.head_type must be one of {HEAD_TYPES}, got {self.head_type!r}")
        if not self.block_widths or not all(isinstance(block, list) and block for block in self.block_widths):
            raise ValueError(
                f"CnnLstmConfig.block_widths must be a non-empty list of non-empty lists, got {self.block_widths!r}"
            )
        for block in self.block_widths:
            for width in block:
                positive_int("block_widths", width)
        for name in ("kernel_size", "pool_size", "lstm_hidden_size", "lstm_num_layers", "fc_size", "num_channels"):
            positive_int(name, getattr(self, name))
        positive_int("image_size", self.image_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"CnnLstmConfig.kernel_size must be odd ('same' padding), got {self.kernel_size}")
        fraction("block_dropout", self.block_dropout)
        fraction("head_dropout", self.head_dropout)
        if self.backbone == "paper":
            feature_size = self.image_size // self.pool_size ** len(self.block_widths)
            if feature_size < 1:
                raise ValueError(
                    f"CnnLstmConfig.image_size {self.image_size} is too small for {len(self.block_widths)} blocks "
                    f"of {self.pool_size}x{self.pool_size} pooling"
                )
        temperature = self.calibration_temperature
        is_number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
        if not is_number or not 0 < temperature < math.inf:
            raise ValueError(
                f"CnnLstmConfig.calibration_temperature must be a finite positive number, got {temperature!r}"
            )
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != self.num_channels:
                raise ValueError(
                    f"CnnLstmConfig.{name} needs one value per channel ({self.num_channels}), got {values!r}"
                )
        if any(value <= 0 for value in self.image_std):
            raise ValueError(f"CnnLstmConfig.image_std must be positive, got {self.image_std!r}")
        if not isinstance(self.crop_to_lungs, bool):
            raise ValueError(f"CnnLstmConfig.crop_to_lungs must be True or False, got {self.crop_to_lungs!r}")

    @property
    def feature_map_size(self) -> int:
        """Side of the paper trunk's last feature map (7 for 224 px and 5 blocks)."""
        return self.image_size // self.pool_size ** len(self.block_widths)


__all__ = ["CnnLstmConfig", "default_normalisation"]
