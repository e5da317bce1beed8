"""The README's screenshot of the app: the shipped model served by `python app.py`, one example X-ray analysed, the
page captured with Debian's Chromium (Playwright, no `playwright install`) and saved as a palette PNG.

    python scripts/screenshot_app.py [--output docs/app.png] [--example examples/NAME] [--tab analyse|report]

Offline: the app runs with HF_HUB_OFFLINE=1 and fair-use limits off. Fails (exit 1) if the PNG is 300 KB or more.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
MAX_BYTES = 300 * 1024


def capture(url: str, example: Path, tab: str, width: int) -> bytes:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": width, "height": 1000}, device_scale_factor=1)
        page.goto(url, wait_until="load", timeout=60_000)  # not networkidle: a heartbeat request stays open
        page.locator("#disclaimer").wait_for(timeout=60_000)
        if tab == "report":
            page.get_by_role("tab", name="Model report").click()
            page.wait_for_function(
                "() => [...document.querySelectorAll('#report-tab img')].filter(i => i.complete && i.naturalWidth)"
                ".length >= 3", timeout=60_000)
        else:
            page.locator("#xray-file input[type=file]").set_input_files(str(example))
            page.wait_for_function(
                "() => { const i = document.querySelector('#overlay img'); return i && i.complete && i.naturalWidth"
                " && document.querySelector('#prevalence-reading').innerText.includes('PPV'); }", timeout=180_000)
            page.wait_for_timeout(500)  # the last progress bar fades
        png = page.screenshot(full_page=True)
        browser.close()
    return png


def smallest_faithful_png(image: Image.Image) -> bytes:
    """The first encoding under MAX_BYTES, best first: true colour; a 256-colour palette with dithering (keeps the
    X-ray's grey ramp); a palette without dithering (posterises the X-ray, but small)."""
    candidates = (
        lambda: image,
        lambda: image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG),
        lambda: image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE),
    )
    for make in candidates:
        buffer = io.BytesIO()
        make().save(buffer, "PNG", optimize=True)
        if buffer.tell() < MAX_BYTES:
            return buffer.getvalue()
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/app.png")
    parser.add_argument("--example", default="examples/covid19-ieee8023-1760ae794275.jpg",
                        help="an X-ray to analyse (default: a COVID-19 example)")
    parser.add_argument("--tab", choices=("analyse", "report"), default="analyse")
    parser.add_argument("--width", type=int, default=1200)
    args = parser.parse_args()
    example = Path(args.example)
    if not example.is_file():
        candidates = sorted((REPO_ROOT / "examples").glob("covid19-*"))
        if not candidates:
            raise SystemExit(f"{example} not found")
        example = candidates[0]
    from benchmark_app import app_process  # the sibling script's launcher (scripts/ is on sys.path when run)

    env = {"HF_HUB_OFFLINE": "1", "CNN_LSTM_RATE_LIMITS": "off"}
    with tempfile.TemporaryDirectory(prefix="cxr-screenshot-") as home, \
            app_process(str(REPO_ROOT / "checkpoints" / "cnn-lstm-cxr3"), env, Path(home)) as url:
        png = capture(url, example.resolve(), args.tab, args.width)
    encoded = smallest_faithful_png(Image.open(io.BytesIO(png)).convert("RGB"))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(encoded)
    image = Image.open(io.BytesIO(encoded))
    print(f"{output}: {image.width}x{image.height}, {image.mode}, {len(encoded) / 1024:.0f} KB")
    return 0 if len(encoded) < MAX_BYTES else 1


if __name__ == "__main__":
    raise SystemExit(main())
