"""The image processor: every input kind reaches the model as the same canonical pixels, bad input is a clear error."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_cnn_lstm import CnnLstmImageProcessor

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


@pytest.fixture(scope="module")
def processor() -> CnnLstmImageProcessor:
    return CnnLstmImageProcessor()


@pytest.fixture(scope="module")
def xray(example_xrays) -> Image.Image:
    with Image.open(example_xrays["normal"][0]) as image:
        image.load()
        return image


def unnormalize(pixel_values: torch.Tensor) -> np.ndarray:
    """Back to the 0..255 scale, to compare with what went in."""
    return (pixel_values.numpy() * STD + MEAN) * 255.0


def test_real_xray_default_output(processor, xray):
    assert xray.mode == "L"
    pixel_values = processor(xray)["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224) and pixel_values.dtype == torch.float32
    # grayscale is repeated to 3 equal channels, before per-channel normalization
    restored = unnormalize(pixel_values[0])
    assert np.allclose(restored[0], restored[1], atol=1e-3) and np.allclose(restored[1], restored[2], atol=1e-3)
    assert restored.min() >= 0 and restored.max() <= 255.001


def test_resize_is_antialiased_bilinear(processor, xray):
    """Compare with an independent antialiased resize (PIL's bilinear filter on the 8-bit image)."""
    pixel_values = processor(xray)["pixel_values"][0]
    reference = np.asarray(xray.resize((224, 224), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.abs(unnormalize(pixel_values)[0] - reference).mean() < 1.5


def test_pil_numpy_and_torch_give_the_same_pixels(processor, xray):
    array = np.asarray(xray)
    from_pil = processor(xray)["pixel_values"]
    from_numpy = processor(array)["pixel_values"]
    from_numpy_hwc1 = processor(array[..., None])["pixel_values"]
    from_torch = processor(torch.from_numpy(array.copy())[None])["pixel_values"]  # CxHxW
    from_float = processor(array.astype(np.float32) / 255.0)["pixel_values"]
    for other in (from_numpy, from_numpy_hwc1, from_torch, from_float):
        assert torch.allclose(from_pil, other, atol=1e-5)


def test_sixteen_bit_keeps_precision_and_matches_eight_bit(processor, xray):
    eight = np.asarray(xray)
    sixteen = eight.astype(np.uint16) * 257  # the same picture on the full 16-bit range
    buffer = io.BytesIO()
    Image.fromarray(sixteen).save(buffer, format="PNG")
    buffer.seek(0)
    with Image.open(buffer) as png16:
        assert png16.mode.startswith("I")
        from_png16 = processor(png16)["pixel_values"]
    from_array16 = processor(sixteen)["pixel_values"]
    expected = processor(eight)["pixel_values"]
    assert torch.allclose(from_png16, expected, atol=1e-4)
    assert torch.allclose(from_array16, expected, atol=1e-4)
    # values between 8-bit steps survive: a 16-bit ramp is not quantized to 256 levels
    ramp = np.tile(np.linspace(0, 65535, 224, dtype=np.uint16)[:512], (224, 1))
    levels = np.unique(processor(ramp, do_normalize=False)["pixel_values"][0, 0].numpy().round(4))
    assert len(levels) > 200


def test_rgba_is_composited_on_black_and_cmyk_is_converted(processor, xray):
    rgb = xray.convert("RGB")
    rgba = rgb.copy()
    alpha = np.full((xray.height, xray.width), 255, dtype=np.uint8)
    alpha[:, : xray.width // 2] = 0  # left half transparent
    rgba.putalpha(Image.fromarray(alpha))
    raw = {"do_normalize": False, "do_rescale": False}
    values = processor(rgba, **raw)["pixel_values"][0]
    assert values[:, :, :100].abs().max() == 0  # transparent -> black, not the hidden colour
    opaque = processor(rgb, **raw)["pixel_values"][0]
    assert torch.allclose(values[:, :, 125:], opaque[:, :, 125:], atol=1e-3)
    cmyk = rgb.convert("CMYK")
    assert torch.allclose(processor(cmyk)["pixel_values"], processor(rgb)["pixel_values"], atol=0.05)


def test_colour_to_one_channel_uses_luminance(xray):
    single = CnnLstmImageProcessor(num_channels=1, image_mean=[0.5], image_std=[0.5])
    colour = np.zeros((40, 40, 3), dtype=np.uint8)
    colour[..., 0] = 255  # pure red
    values = single(colour, do_normalize=False, do_rescale=False)["pixel_values"]
    assert values.shape == (1, 1, 224, 224)
    assert torch.allclose(values, torch.full_like(values, 0.299 * 255), atol=1e-3)


def test_pad_mode_keeps_aspect_ratio():
    processor = CnnLstmImageProcessor(resize_mode="pad")
    wide = np.full((100, 200), 200, dtype=np.uint8)
    values = processor(wide, do_normalize=False, do_rescale=False)["pixel_values"][0, 0]
    assert values.shape == (224, 224)
    # 200x100 -> 224x112 content centred, 56 rows of padding above and below
    assert values[:56].abs().max() == 0 and values[-56:].abs().max() == 0
    assert torch.allclose(values[56:168], torch.full((112, 224), 200.0), atol=1e-3)


def test_batches(processor, example_xrays):
    images = [Image.open(path) for paths in example_xrays.values() for path in paths[:2]]
    batch = processor(images)["pixel_values"]
    assert batch.shape == (6, 3, 224, 224)
    assert torch.allclose(batch[3], processor(images[3])["pixel_values"][0])
    stacked = np.stack([np.asarray(image.resize((300, 300))) for image in images])  # BxHxW uint8
    assert processor(list(stacked))["pixel_values"].shape == (6, 3, 224, 224)
    assert processor(torch.from_numpy(stacked)[:, None])["pixel_values"].shape == (6, 3, 224, 224)  # BxCxHxW
    assert processor(images, return_tensors="np")["pixel_values"].shape == (6, 3, 224, 224)
    assert len(processor(images, return_tensors=None)["pixel_values"]) == 6


@pytest.mark.parametrize(
    ("bad_input", "message"),
    [
        (np.zeros((0, 10), dtype=np.uint8), "empty|zero size"),
        (np.zeros((10, 0, 3), dtype=np.uint8), "empty|zero size"),
        (np.full((8, 8), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.array([[0.0, np.inf]], dtype=np.float64), "NaN or infinite"),
        (np.zeros((8, 8, 5), dtype=np.uint8), "HxW or HxWxC"),
        (np.zeros((2, 3, 4, 5, 6), dtype=np.uint8), "HxW or HxWxC"),
        (np.zeros((8, 8), dtype=np.complex64), "unsupported image dtype"),
        ("chest.png", "open the file first"),
        (12, "unsupported image type int"),
        ([], "no images"),
        (None, "no images"),
        (np.zeros((0, 8, 8, 3), dtype=np.uint8), "no images"),
    ],
)
def test_bad_input_is_a_clear_value_error(processor, bad_input, message):
    with pytest.raises(ValueError, match=message):
        processor(bad_input)


def test_bad_image_in_a_batch_is_named(processor, xray):
    with pytest.raises(ValueError, match="image 1: .*NaN"):
        processor([xray, np.full((4, 4), np.nan, dtype=np.float32)])


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="resize_mode"):
        CnnLstmImageProcessor(resize_mode="crop")
    with pytest.raises(ValueError, match="num_channels"):
        CnnLstmImageProcessor(num_channels=2)
    with pytest.raises(ValueError, match="image_std"):
        CnnLstmImageProcessor(image_std=[0.2, 0.0, 0.2])
    with pytest.raises(ValueError, match="unknown arguments"):
        CnnLstmImageProcessor()(np.zeros((4, 4), dtype=np.uint8), do_crop=True)


def test_save_and_load_round_trip(tmp_path):
    processor = CnnLstmImageProcessor(resize_mode="pad", size={"height": 64, "width": 64}, pad_value=10.0)
    processor.save_pretrained(tmp_path)
    loaded = CnnLstmImageProcessor.from_pretrained(tmp_path)
    assert (loaded.resize_mode, loaded.size, loaded.pad_value) == ("pad", {"height": 64, "width": 64}, 10.0)
    image = np.random.default_rng(0).integers(0, 255, (50, 90), dtype=np.uint8)
    assert torch.equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])


def test_mode_i_follows_the_integer_array_rule(processor, xray):
    """PIL mode "I" (32-bit ints) is not assumed 16-bit: 8-bit values stay 8-bit, as for an int32 array."""
    eight = np.asarray(xray)
    as_mode_i = Image.fromarray(eight.astype(np.int32), mode="I")
    assert as_mode_i.mode == "I"
    assert torch.allclose(processor(as_mode_i)["pixel_values"], processor(eight)["pixel_values"], atol=1e-5)
    wide = Image.fromarray(eight.astype(np.int32) * 257, mode="I")  # beyond 8 bits: the 16-bit range
    assert torch.allclose(processor(wide)["pixel_values"], processor(eight)["pixel_values"], atol=1e-4)
