"""A screenshot of serve.py's page after images are dropped on it, taken in headless Chromium (Playwright):

    python tools/page_screenshot.py --checkpoint=runs/demo/resnet18/last.pt \
        --images=data/synthetic/JPEGImages/val_000000.jpg,data/synthetic/JPEGImages/val_000001.jpg \
        --out=docs/serve_page.png

Starts serve.py on the checkpoint (CPU, fp32), opens its page, chooses the images and waits for their boxes.
Chromium is Debian's (apt-get install chromium) or the CHROMIUM environment variable's.
"""
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.serve_process import start_server  # noqa: E402
from yolo.config import resolve_config  # noqa: E402

checkpoint = "runs/demo/resnet18/last.pt"  # what serve.py serves
images = ("data/synthetic/JPEGImages/val_000000.jpg",)  # the images chosen on the page, in order
out = "docs/serve_page.png"    # the PNG written
width = 1100                   # the browser window's width, in CSS pixels

# Chromium as root, offline: no sandbox, and none of its calls to Google's hosts.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium")


def open_browser(playwright):
    executable = find_chromium()
    if not executable:
        raise FileNotFoundError("no Chromium: install Debian's chromium package (apt-get install chromium), or set "
                                "CHROMIUM to a Chromium or Chrome executable")
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)


def main(config: dict) -> None:
    from playwright.sync_api import sync_playwright
    server, url = start_server(config["checkpoint"], "--device=cpu")
    try:
        with sync_playwright() as playwright:
            browser = open_browser(playwright)
            page = browser.new_page(viewport={"width": config["width"], "height": 600})
            page.goto(url)
            page.wait_for_function("document.getElementById('model-details').textContent.includes('classes')")
            page.set_input_files("#files", list(config["images"]))
            page.wait_for_function(f"document.querySelectorAll('.result.done').length === {len(config['images'])}")
            page.screenshot(path=config["out"], full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"wrote {config['out']}")


if __name__ == "__main__":
    main(resolve_config(globals()))
