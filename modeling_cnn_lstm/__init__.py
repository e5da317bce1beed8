"""CNN-LSTM chest X-ray classifier as a Hugging Face custom model (research use only, not for diagnosis)."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from .configuration_cnn_lstm import PAPER_BLOCK_WIDTHS, CnnLstmConfig
from .fast_inference_cnn_lstm import CnnLstmFastInference, CnnLstmLogits
from .image_processing_cnn_lstm import CnnLstmImageProcessor
from .modeling_cnn_lstm import CnnLstmForImageClassification, CnnLstmModel, CnnLstmPreTrainedModel

# Local registration: `AutoModelForImageClassification.from_pretrained(folder)` works in this environment without
# remote code; saved folders carry `auto_map` entries so that elsewhere `trust_remote_code=True` loads them.
AutoConfig.register("cnn_lstm", CnnLstmConfig, exist_ok=True)
AutoModel.register(CnnLstmConfig, CnnLstmModel, exist_ok=True)
AutoModelForImageClassification.register(CnnLstmConfig, CnnLstmForImageClassification, exist_ok=True)
AutoImageProcessor.register(
    CnnLstmConfig,
    slow_image_processor_class=CnnLstmImageProcessor,
    fast_image_processor_class=CnnLstmImageProcessor,
    exist_ok=True,
)
CnnLstmConfig.register_for_auto_class()
CnnLstmModel.register_for_auto_class("AutoModel")
CnnLstmForImageClassification.register_for_auto_class("AutoModelForImageClassification")
CnnLstmImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "PAPER_BLOCK_WIDTHS",
    "CnnLstmConfig",
    "CnnLstmFastInference",
    "CnnLstmForImageClassification",
    "CnnLstmImageProcessor",
    "CnnLstmLogits",
    "CnnLstmModel",
    "CnnLstmPreTrainedModel",
]
