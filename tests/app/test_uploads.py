"""Upload reading, path by path: the bounded DICOM reader (deflate budget, read budget, first frame only, codestream
headers against Rows/Columns, impossible window and LUT values), float TIFFs, the structure guards, the working-size
reduction, the decode cache, and that DICOM patient data never leaves the reader. The whole set of crafted files, sent
to a running server with its peak memory measured, is tests/app/test_hostile_uploads.py."""

from __future__ import annotations

import json
import logging
import struct
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_app import codestreams, dicom_header, uploads
from cxr_app.upload_types import DEFLATED_BUDGET, MAX_PIXELS, MAX_WORKING_VALUES
from cxr_app.uploads import (
    CorruptImageError,
    DecodeCache,
    ImageTooLargeError,
    InputError,
    NotAnImageError,
    UnsupportedImageError,
    read_upload,
)
from tests.app import crafted_files as craft

RAMP = (np.add.outer(np.arange(96), np.arange(80)) * 40).astype(np.uint16)  # 96x80, 0..6960


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def jpeg_dicom(frames: list[bytes], rows: int = 64, columns: int = 64, syntax: str = "1.2.840.10008.1.2.4.50",
               **tags: object) -> bytes:
    return craft.dicom(rows, columns, bits=8, frames=len(frames) if len(frames) > 1 else None,
                       pixel_data=craft.encapsulate(frames), syntax=syntax, **tags)


class TestDeflatedDicom:
    def test_a_deflated_file_is_read(self, tmp_path):
        data = craft.dicom(96, 80, pixel_data=RAMP.tobytes())
        plain = read_upload(write(tmp_path, "p.dcm", data))
        deflated = read_upload(write(tmp_path, "d.dcm", craft.deflated(data)))
        np.testing.assert_array_equal(deflated.pixels, plain.pixels)

    def test_a_deflate_bomb_is_refused_within_the_budget(self, tmp_path):
        path = write(tmp_path, "bomb.dcm", craft.deflate_bomb(2048))  # 2 GiB inflated
        assert path.stat().st_size < 3 * 2**20
        tracemalloc.start()
        try:
            with pytest.raises(ImageTooLargeError, match="inflates to more than"):
                read_upload(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        print(f"deflate bomb of 2 GiB: peak Python allocation {peak / 2**20:.0f} MiB (budget "
              f"{DEFLATED_BUDGET / 2**20:.0f} MiB)")
        assert peak < DEFLATED_BUDGET + 32 * 2**20

    def test_pydicom_never_inflates_by_itself(self, tmp_path, monkeypatch):
        import zlib

        monkeypatch.setattr(zlib, "decompress", lambda *args, **kwargs: pytest.fail("whole-stream inflate"))
        path = write(tmp_path, "d.dcm", craft.deflated(craft.dicom(96, 80, pixel_data=RAMP.tobytes())))
        assert read_upload(path).kind == "DICOM"

    def test_a_broken_deflate_stream(self, tmp_path):
        head, _ = craft.split_meta(craft.deflated(craft.dicom()))
        with pytest.raises(CorruptImageError, match="cannot be inflated"):
            read_upload(write(tmp_path, "broken.dcm", head + b"\xff" * 1000))


class TestDicomReadBudget:
    @pytest.mark.parametrize("items", [1_000_000])
    def test_a_header_of_empty_items(self, tmp_path, items):
        bomb = craft.element(0x0008, 0x1140, b"SQ", craft.item() * items + craft.SEQUENCE_END, 0xFFFFFFFF)
        with pytest.raises(ImageTooLargeError, match="too complex"):
            read_upload(write(tmp_path, "items.dcm", craft.dicom(before_pixels=bomb)))

    def test_a_long_character_set(self, tmp_path):
        charset = craft.element(0x0008, 0x0005, b"UC", b"AB\\" * 500_000 + b"AB")
        with pytest.raises(ImageTooLargeError, match="too complex"):
            read_upload(write(tmp_path, "cs.dcm", craft.dicom(before_pixels=charset)))

    def test_a_real_header_is_far_below_the_budget(self, tmp_path, monkeypatch):
        reads = []
        original = dicom_header._CountingReader.read

        def counting(self, size=-1):
            reads.append(size)
            return original(self, size)

        monkeypatch.setattr(dicom_header._CountingReader, "read", counting)
        read_upload(write(tmp_path, "x.dcm", craft.dicom(96, 80, pixel_data=RAMP.tobytes(), WindowCenter=3000,
                                                         WindowWidth=6000)))
        assert 20 < len(reads) < 500

    @pytest.mark.parametrize(
        ("extra", "words"),
        [
            (craft.element(0x0028, 0x1051, b"UN", b"1\\" * 100_000), "impossible value"),  # 100k-term list
            (craft.element(0x0028, 0x0010, b"SQ", craft.item() * 10), "impossible value"),  # Rows as a sequence
        ],
    )
    def test_values_pydicom_would_expand(self, tmp_path, extra, words):
        with pytest.raises(CorruptImageError, match=words):
            read_upload(write(tmp_path, "v.dcm", craft.dicom(before_pixels=extra)))

    @pytest.mark.parametrize("undefined_length", [False, True])
    def test_lut_data_that_pydicom_would_expand(self, tmp_path, undefined_length):
        lut = craft.element(0x0028, 0x3002, b"US", struct.pack("<3H", 4096, 0, 12))
        lut += craft.element(0x0028, 0x3006, b"UN", bytes(4 << 20))  # UN: read as US, 2M Python ints
        if undefined_length:
            sequence = craft.element(0x0028, 0x3010, b"SQ", craft.item(lut) + craft.SEQUENCE_END, 0xFFFFFFFF)
        else:
            sequence = craft.element(0x0028, 0x3010, b"SQ", craft.item(lut))
        with pytest.raises(CorruptImageError, match="VOILUTSequence holds a malformed item"):
            read_upload(write(tmp_path, "lut.dcm", craft.dicom(before_pixels=sequence)))

    def test_a_sequence_in_the_file_meta(self, tmp_path):
        head, body = craft.split_meta(craft.dicom())
        sequence = craft.element(0x0002, 0x0100, b"SQ", craft.item() * 10 + craft.SEQUENCE_END, 0xFFFFFFFF)
        with pytest.raises(CorruptImageError, match="meta information"):
            read_upload(write(tmp_path, "m.dcm", head + sequence + body))


class TestCompressedDicom:
    def test_only_the_first_frame_is_decoded(self, tmp_path):
        """The second frame is garbage: decoding it would fail, so the answer proves it was never decoded."""
        good = craft.encode(craft.gradient(64, 64), "JPEG")
        loaded = read_upload(write(tmp_path, "f.dcm", jpeg_dicom([good, b"\xff\xd8" + bytes(500) + b"\xff\xd9"])))
        assert loaded.pixels.shape == (64, 64, 1) and "2 frames; the first one was used" in loaded.notes[0]

    def test_native_multiframe_reads_one_frame(self, tmp_path, monkeypatch):
        from pydicom import pixels

        indexes = []
        original = pixels.pixel_array
        def recording(ds, **options):
            indexes.append(options.get("index"))
            return original(ds, **options)

        monkeypatch.setattr(pixels, "pixel_array", recording)
        frames = np.stack([RAMP, RAMP[::-1], RAMP])
        loaded = read_upload(write(tmp_path, "n.dcm", craft.dicom(96, 80, frames=3, pixel_data=frames.tobytes())))
        assert indexes == [0] and loaded.pixels.shape == (96, 80, 1)

    @pytest.mark.parametrize("kind", ["JPEG", "JPEG-SOF", "J2K"])
    def test_a_frame_larger_than_rows_and_columns_is_not_decoded(self, tmp_path, monkeypatch, kind):
        from pydicom import pixels

        monkeypatch.setattr(pixels, "pixel_array", lambda *args, **kwargs: pytest.fail("decoded"))
        if kind == "JPEG":
            data = jpeg_dicom([craft.encode(craft.gradient(640, 480), "JPEG")])
        elif kind == "JPEG-SOF":
            data = jpeg_dicom([craft.jpeg_with_size(craft.encode(craft.gradient(64, 64), "JPEG"), 30_000, 30_000)])
        else:
            data = jpeg_dicom([craft.j2k(craft.gradient(640, 480))], syntax="1.2.840.10008.1.2.4.90")
        with pytest.raises(CorruptImageError, match="header says 64x64"):
            read_upload(write(tmp_path, "big.dcm", data))

    def test_rle_frames(self, tmp_path):
        grey = np.asarray(craft.gradient(64, 64))
        good = craft.rle_frame([craft.rle_segment(grey.tobytes())])
        loaded = read_upload(write(tmp_path, "r.dcm", jpeg_dicom([good], syntax="1.2.840.10008.1.2.5")))
        assert loaded.pixels.shape == (64, 64, 1)
        bomb = craft.rle_frame([b"\x81\x00" * 100_000])  # 200 KB that decode to 12.8 MB
        with pytest.raises(ImageTooLargeError, match="decodes to more than its 64x64"):
            read_upload(write(tmp_path, "bomb.dcm", jpeg_dicom([bomb], syntax="1.2.840.10008.1.2.5")))
        two = craft.rle_frame([craft.rle_segment(grey.tobytes())] * 2)
        with pytest.raises(CorruptImageError, match="no valid image header"):
            read_upload(write(tmp_path, "two.dcm", jpeg_dicom([two], syntax="1.2.840.10008.1.2.5")))

    def test_pillow_decoding_runs_under_the_bomb_guard(self, tmp_path, monkeypatch):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 64x64 = 4096 pixels: over it, under twice it
        with pytest.raises(ImageTooLargeError, match="decompression-bomb guard"):
            read_upload(write(tmp_path, "j.dcm", jpeg_dicom([craft.encode(craft.gradient(64, 64), "JPEG")])))

    def test_missing_decoders_and_unknown_syntaxes(self, tmp_path):
        frame = craft.encode(craft.gradient(64, 64), "JPEG")
        for syntax in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.92"):  # JPEG-LS; J2K Part 2 (no pydicom decoder)
            with pytest.raises(UnsupportedImageError, match="no decoder for it is installed"):
                read_upload(write(tmp_path, "ls.dcm", jpeg_dicom([frame], syntax=syntax)))
        with pytest.raises(UnsupportedImageError, match="not supported"):
            read_upload(write(tmp_path, "mp.dcm", jpeg_dicom([frame], syntax="1.2.840.10008.1.2.4.100")))

    def test_offset_tables_longer_than_the_frames(self, tmp_path):
        frame = craft.encode(craft.gradient(64, 64), "JPEG")
        data = craft.dicom(bits=8, syntax="1.2.840.10008.1.2.4.50",
                           pixel_data=craft.encapsulate([frame], offset_table=bytes(4000)))
        with pytest.raises(CorruptImageError, match="offset table"):
            read_upload(write(tmp_path, "bot.dcm", data))


class TestDicomDisplayValues:
    @pytest.mark.parametrize(
        ("tags", "words"),
        [
            ({"WindowCenter": 100, "WindowWidth": 0}, "Window Width must be a positive number"),
            ({"WindowCenter": 100, "WindowWidth": -5}, "Window Width must be a positive number"),
            ({"WindowCenter": 100, "WindowWidth": 0.5}, "Window Width must be a positive number"),
            ({"WindowCenter": 100, "WindowWidth": 10, "VOILUTFunction": "CUBIC"}, "VOI LUT Function"),
            ({"RescaleSlope": "1e308", "RescaleIntercept": 0}, "infinite"),
        ],
    )
    def test_impossible_values_are_input_errors(self, tmp_path, tags, words):
        with pytest.raises(CorruptImageError, match=words):
            read_upload(write(tmp_path, "w.dcm", craft.dicom(96, 80, pixel_data=RAMP.tobytes(), **tags)))

    @pytest.mark.parametrize(("keyword", "tag"), [("WindowWidth", 0x1051), ("WindowCenter", 0x1050),
                                                  ("RescaleSlope", 0x1053)])
    @pytest.mark.parametrize("text", ["abc", "nan", "inf"])
    def test_values_that_are_no_numbers(self, tmp_path, keyword, tag, text):
        raw = text.encode() + b" " * (len(text) % 2)
        others = {"WindowCenter": 100, "WindowWidth": 200, "RescaleIntercept": 0, "RescaleSlope": 1}
        others.pop(keyword)
        data = craft.dicom(96, 80, pixel_data=RAMP.tobytes(), before_pixels=craft.element(0x0028, tag, b"DS", raw),
                           **others)
        with pytest.raises(CorruptImageError, match=f"{keyword} is not a valid number"):
            read_upload(write(tmp_path, "n.dcm", data))

    @pytest.mark.parametrize(
        "descriptor", [[4096, 0, 40], [4096, 0, 9], [0, 0, 12], [4096, 0]],
    )
    def test_voi_lut_descriptor_nonsense(self, tmp_path, descriptor):
        lut = craft.element(0x0028, 0x3002, b"US", struct.pack(f"<{len(descriptor)}H", *descriptor))
        lut += craft.element(0x0028, 0x3006, b"OW", bytes(2 * 4096))
        data = craft.dicom(96, 80, pixel_data=RAMP.tobytes(),
                           before_pixels=craft.element(0x0028, 0x3010, b"SQ", craft.item(lut)))
        with pytest.raises(CorruptImageError, match="VOI LUT is invalid"):
            read_upload(write(tmp_path, "l.dcm", data))


class TestImages:
    @pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
    def test_non_finite_float_tiff_is_refused(self, tmp_path, value):
        values = np.linspace(0, 1, 128 * 128, dtype=np.float32).reshape(128, 128)
        values[10, 10] = value
        with pytest.raises(CorruptImageError, match=r"not numbers \(NaN\) or are infinite"):
            read_upload(write(tmp_path, "f.tif", craft.float_tiff(values)))

    def test_float_tiff_of_any_finite_range(self, tmp_path):
        values = np.linspace(-3e38, 3e38, 128 * 128, dtype=np.float32).reshape(128, 128)
        loaded = read_upload(write(tmp_path, "f.tif", craft.float_tiff(values)))
        assert loaded.pixels.min() == 0 and loaded.pixels.max() == pytest.approx(255, abs=1e-3)
        unit = read_upload(write(tmp_path, "u.tif", craft.float_tiff(values / 3e38 * 0.5 + 0.5)))
        assert unit.pixels.max() == pytest.approx(255, abs=1e-3)  # [0, 1] -> x255, the processor's rule

    def test_pillow_limit_is_the_app_limit(self):
        assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS

    @pytest.mark.parametrize(
        ("build", "words"),
        [
            (lambda: craft.tiff(craft.grey_tiff_entries(64, 64, 64 * 64), bytes(4 << 20),
                                shared={40000 + i: 4 << 20 for i in range(20)}), "share their data"),
            (lambda: craft.tiff([(256, 4, 64), (257, 4, 64), (258, 3, 8), (259, 3, 1), (262, 3, 1), (277, 3, 1),
                                 (278, 4, 1), (273, 4, struct.pack("<5000I", *[8] * 5000)),
                                 (279, 4, struct.pack("<5000I", *[1] * 5000))], bytes(64)), "strip/tile table"),
            (lambda: craft.png(64, 64, before_idat=[craft.png_chunk(b"tEXt", b"k\x00v")] * 2000), "text"),
        ],
    )
    def test_structure_guards(self, tmp_path, monkeypatch, build, words):
        monkeypatch.setattr(Image, "open", lambda *args, **kwargs: pytest.fail("Pillow opened it"))
        path = write(tmp_path, "s.tif" if b"II*" in build()[:4] else "s.png", build())
        with pytest.raises(ImageTooLargeError, match=words):
            read_upload(path)

    def test_exif_orientation_without_pillow_exif(self, tmp_path, monkeypatch):
        """A PNG's EXIF block: Pillow never loads it unless asked (a JPEG's it loads at open, hence the check of
        its structure)."""
        data = craft.encode(craft.gradient(300, 200), "PNG", exif=craft.exif_bomb(3000, 1 << 20))
        monkeypatch.setattr(Image.Image, "getexif", lambda self: pytest.fail("Pillow's EXIF reader ran"))
        loaded = read_upload(write(tmp_path, "o.png", data))
        assert (loaded.width, loaded.height) == (200, 300)

    def test_jpeg_exif_blocks_that_pillow_would_expand(self, tmp_path):
        jpeg = craft.encode(craft.gradient(300, 200), "JPEG")
        rotated = read_upload(write(tmp_path, "r.jpg", craft.jpeg_with_exif(jpeg, craft.exif_bomb(3, 64))))
        assert (rotated.width, rotated.height) == (200, 300)
        with pytest.raises(ImageTooLargeError, match="share their data"):
            read_upload(write(tmp_path, "b.jpg", craft.jpeg_with_exif(jpeg, craft.exif_bomb(2000, 30_000))))

    def test_large_images_are_reduced_to_the_working_budget(self, tmp_path):
        loaded = read_upload(write(tmp_path, "big.png", craft.png(6000, 5000, colour=2)))  # 90 M values
        assert loaded.pixels.size <= MAX_WORKING_VALUES and loaded.pixels.shape == (1667, 2000, 3)
        assert "reduced to 2000x1667 px" in loaded.notes[0]
        grey = read_upload(write(tmp_path, "grey.png", craft.png(4300, 4300)))  # a detector image: unchanged
        assert grey.pixels.shape == (4300, 4300, 1) and grey.notes == []

    def test_reduction_keeps_brightness(self, tmp_path):
        image = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8).repeat(20), (5200, 1)))  # 5120x5200
        loaded = read_upload(write(tmp_path, "r.png", craft.encode(image, "PNG")))
        assert loaded.width == 2560 and loaded.pixels.mean() == pytest.approx(127.5, abs=0.5)

    def test_other_image_formats_are_named(self, tmp_path):
        with pytest.raises(UnsupportedImageError, match="GIF images"):
            read_upload(write(tmp_path, "a.png", craft.encode(craft.gradient(), "GIF")))
        with pytest.raises(UnsupportedImageError, match="JPEG 2000 images"):
            read_upload(write(tmp_path, "a.jpg", craft.j2k(craft.gradient())))


class TestCodestreams:
    def test_jpeg_and_jpeg_ls_frame_headers(self):
        assert codestreams.jpeg_frame(craft.encode(craft.gradient(120, 90), "JPEG")) == (90, 120, 1)
        jpeg_ls = b"\xff\xd8\xff\xf7\x00\x0b\x10" + struct.pack(">HH", 300, 200) + b"\x01\x01\x11\x00"
        assert codestreams.jpeg_frame(jpeg_ls) == (300, 200, 1)
        with pytest.raises(codestreams.Malformed):
            codestreams.jpeg_frame(b"\xff\xd8\xff\xda\x00\x02")

    def test_j2k_size(self):
        assert codestreams.j2k_frame(craft.j2k(craft.gradient(120, 90))) == (90, 120, 1)
        jp2 = craft.encode(craft.gradient(70, 80), "JPEG2000", no_jp2=False)
        assert codestreams.j2k_frame(jp2) == (80, 70, 1)

    def test_rle_decoded_length(self):
        assert codestreams.rle_decoded_length(craft.rle_segment(bytes(1000)), 10_000) == 1000
        assert codestreams.rle_decoded_length(b"\x81\x07" * 10, 10_000) == 1280
        assert codestreams.rle_decoded_length(b"\x81\x07" * 1000, 500) <= 628  # stops once past the cap

    def test_exif_orientation(self):
        assert codestreams.exif_orientation(b"Exif\x00\x00" + craft.exif_bomb(3, 10, orientation=8)) == 8
        assert codestreams.exif_orientation(b"garbage") == 1 and codestreams.exif_orientation(None) == 1


class TestDecodeCache:
    def test_hits_copies_and_invalidation(self, tmp_path):
        cache = DecodeCache()
        path = write(tmp_path, "a.png", craft.encode(craft.gradient(), "PNG"))
        first, second = cache.read(path), cache.read(str(path))
        assert (cache.hits, cache.misses) == (1, 1)
        assert second.pixels is first.pixels and not first.pixels.flags.writeable
        second.notes.append("mine")
        assert cache.read(path).notes == []
        path.write_bytes(craft.encode(craft.gradient(300, 200), "PNG"))  # replaced in place
        assert cache.read(path).width == 300 and cache.misses == 2

    def test_input_errors_are_cached_too(self, tmp_path):
        cache = DecodeCache()
        path = write(tmp_path, "t.png", b"not an image at all\n" * 10)
        errors = []
        for _ in range(2):
            with pytest.raises(NotAnImageError) as caught:
                cache.read(path)
            errors.append(caught.value)
        assert cache.hits == 1 and errors[0] is not errors[1] and str(errors[0]) == str(errors[1])

    def test_bounded_by_bytes_and_entries(self, tmp_path):
        one = 256 * 256 * 4  # float32 grey
        cache = DecodeCache(max_bytes=3 * one, max_entries=10)
        paths = [write(tmp_path, f"{i}.png", craft.encode(craft.gradient(256, 256 + 0 * i), "PNG")) for i in range(5)]
        for path in paths:
            cache.read(path)
        assert cache.size == (3, 3 * one)
        cache.read(paths[2])  # still held: a hit, and now the most recent
        cache.read(paths[0])  # evicted earlier: read again, evicting the least recent (paths[3])
        assert cache.hits == 1 and cache.size == (3, 3 * one)
        small = DecodeCache(max_bytes=10 * one, max_entries=2)
        for path in paths:
            small.read(path)
        assert small.size[0] == 2
        tiny = DecodeCache(max_bytes=one - 1)  # an entry larger than the whole cache is not kept
        tiny.read(paths[0])
        assert tiny.size == (0, 0)

    def test_entries_expire(self, tmp_path):
        now = [0.0]
        cache = DecodeCache(max_age_s=60, clock=lambda: now[0])
        first, second = (write(tmp_path, f"{i}.png", craft.encode(craft.gradient(), "PNG")) for i in range(2))
        cache.read(first)
        now[0] = 50.0
        cache.read(second)
        cache.read(first)  # a hit does not renew it
        now[0] = 70.0
        assert cache.size == (1, 256 * 256 * 4)  # the first expired, the second not yet
        cache.read(first)
        assert (cache.hits, cache.misses) == (1, 3)

    def test_thread_safe(self, tmp_path):
        cache = DecodeCache(max_bytes=2 * 256 * 256 * 4, max_entries=3)
        paths = [write(tmp_path, f"{i}.png", craft.encode(craft.gradient(256, 256), "PNG")) for i in range(6)]
        failures = []

        def work(seed: int) -> None:
            try:
                for step in range(30):
                    assert cache.read(paths[(seed + step) % len(paths)]).pixels.shape == (256, 256, 1)
            except Exception as error:  # noqa: BLE001 - collected for the main thread
                failures.append(error)

        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == [] and cache.size[0] <= 2 and cache.hits + cache.misses == 180

    def test_predict_then_explain_decode_once(self, tmp_path, monkeypatch, make_checkpoint, example_xrays):
        from cxr_app.demo import CxrDemo

        cache = DecodeCache()
        monkeypatch.setattr(uploads, "DECODE_CACHE", cache)
        make_checkpoint(tmp_path / "model")
        app = CxrDemo.from_source(str(tmp_path / "model"))
        path = str(example_xrays["normal"][0])
        app.predict(path)
        app.explain(path, "Grad-CAM")
        app.explain(path, "Grad-CAM", "COVID-19")
        assert (cache.misses, cache.hits) == (1, 2)


class TestPatientData:
    """Only DICOM_SAFE_TAGS leave the reader: not in the result, the summary, an error message or a log line."""

    def test_never_in_results_summaries_errors_or_logs(self, tmp_path, caplog, make_checkpoint):
        from pydicom import config

        from cxr_app.demo import CxrDemo

        make_checkpoint(tmp_path / "model")
        app = CxrDemo.from_source(str(tmp_path / "model"))
        caplog.set_level(logging.DEBUG)
        config.debug(True)  # pydicom's own debug log prints element values
        try:
            good = write(tmp_path, "good.dcm", craft.dicom(96, 80, pixel_data=RAMP.tobytes(), WindowCenter=3000,
                                                           WindowWidth=6000, ViewPosition="PA"))
            loaded = read_upload(good)
            _, summary = app.predict(str(good))
            texts = [json.dumps([loaded.dicom, loaded.notes, loaded.kind]), summary]
            bad = [
                craft.dicom(96, 80, pixel_data=RAMP.tobytes(), WindowCenter=1, WindowWidth=0),
                craft.dicom(96, 80, pixel_data=RAMP.tobytes()[:100]),
                craft.dicom(before_pixels=craft.element(0x0028, 0x1051, b"UN", b"Doe^Jane\\" * 1000)),
                craft.deflate_bomb(200),
                jpeg_dicom([craft.encode(craft.gradient(640, 480), "JPEG")]),
                craft.dicom(96, 80, pixel_data=RAMP.tobytes())[:700],
            ]
            for index, data in enumerate(bad):
                with pytest.raises(InputError) as caught:
                    app.predict(str(write(tmp_path, f"bad{index}.dcm", data)))
                texts.append(str(caught.value))
        finally:
            config.debug(False)
        assert set(loaded.dicom) <= set(uploads.DICOM_SAFE_TAGS) and loaded.dicom["ViewPosition"] == "PA"
        texts.append(caplog.text)
        leaks = [text for text in craft.PATIENT_STRINGS for field in texts if text in field]
        assert leaks == [], leaks

    def test_patient_tags_are_not_even_read(self, tmp_path, monkeypatch):
        from pydicom import dcmread

        datasets = []
        original = dicom_header._parse
        monkeypatch.setattr(dicom_header, "_parse", lambda *args: datasets.append(original(*args)) or datasets[-1])
        path = write(tmp_path, "p.dcm", craft.dicom(96, 80, pixel_data=RAMP.tobytes()))
        read_upload(path)
        (ds,) = datasets
        assert set(craft.PATIENT_TAGS) <= set(dcmread(path).dir())  # the file holds them ...
        assert not set(craft.PATIENT_TAGS) & set(ds.dir())  # ... the reader never parsed them
