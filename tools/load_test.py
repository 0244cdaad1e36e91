"""Load on serve.py: requests from concurrent clients against the server on 127.0.0.1, and a loop of `predict`
calls on the same images in this process, measured in one run on the same machine.

    python tools/load_test.py --checkpoint=runs/demo/resnet18/last.pt --images=data/synthetic/JPEGImages

Starts serve.py (its defaults but the port, any free one) on the checkpoint, sends `requests` images from
`clients` threads at once, each waiting for its answer before sending the next, and counts the answers that are
not 200 or whose detections differ from the loop's. Then stops the server and times `predict` on one image at
a time. Prints images per second of both; exits 1 when any request failed.
"""
import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.serve_process import start_server  # noqa: E402
from yolo.api import load_detector  # noqa: E402
from yolo.config import at_least, resolve_config  # noqa: E402
from yolo.imagecheck import IMAGE_SUFFIXES  # noqa: E402

checkpoint = "runs/demo/resnet18/last.pt"  # a train.py checkpoint (or an export.py .onnx)
images = "data/synthetic/JPEGImages"       # folder of the images sent, in name order, again from the first
requests = 200                 # requests in all
clients = 8                    # concurrent clients, each sending its next request once answered
device = "cpu"                 # serve.py's and the loop's device
timeout_s = 120.0              # seconds a request may take before it counts as failed

RULES = {"requests": at_least(1), "clients": at_least(1), "timeout_s": at_least(0.1)}


def send(url: str, data: bytes, timeout: float) -> tuple[int, list]:
    """POST the image file's bytes as the body (the server reads an image from its bytes, whatever type the
    request says): (the status, the detections), (0, []) when no answer came."""
    try:
        with urllib.request.urlopen(f"{url}/predict", data=data, timeout=timeout) as response:
            return response.status, json.load(response)["detections"]
    except urllib.error.HTTPError as error:
        return error.code, []
    except OSError:
        return 0, []


def same_detections(answer: list, expected: np.ndarray) -> bool:
    found = np.array([[row[key] for key in ("x1", "y1", "x2", "y2", "score", "class_id")] for row in answer]
                     ).reshape(-1, 6)
    return found.shape == expected.shape and np.allclose(found, expected, rtol=1e-4, atol=1e-3)


def main(config: dict) -> None:
    paths = sorted(path for path in Path(config["images"]).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        sys.exit(f"error: no images in {config['images']}")
    chosen = [paths[index % len(paths)] for index in range(config["requests"])]
    data = {path: path.read_bytes() for path in set(chosen)}

    detector = load_detector(config["checkpoint"], config["device"], "fp32")
    detector.predict(chosen[0])  # warm-up, as the server's first request below
    started = time.perf_counter()
    expected = {}
    for path in chosen:  # the loop of predict calls, one image at a time
        result = detector.predict(path)
        expected[path] = np.column_stack([result.boxes.numpy() + [1, 1, 0, 0], result.scores.numpy(),
                                          result.labels.numpy()])
    loop_rate = len(chosen) / (time.perf_counter() - started)

    process, url = start_server(config["checkpoint"], f"--device={config['device']}")
    try:
        send(url, data[chosen[0]], config["timeout_s"])  # the first request after start pays for warm-up
        started = time.perf_counter()
        with ThreadPoolExecutor(config["clients"]) as pool:
            answers = list(pool.map(lambda path: send(url, data[path], config["timeout_s"]), chosen))
        served_rate = len(chosen) / (time.perf_counter() - started)
    finally:
        process.terminate()
        process.wait(timeout=60)
    failed = sum(status != 200 for status, _ in answers)
    different = sum(status == 200 and not same_detections(rows, expected[path])
                    for (status, rows), path in zip(answers, chosen))
    print(f"serve.py: {len(chosen)} requests from {config['clients']} clients: {served_rate:.1f} images/s, "
          f"{failed} failed, {different} with detections unlike predict's")
    print(f"predict, one image a call: {loop_rate:.1f} images/s ({served_rate / loop_rate:.2f}x)")
    if failed or different:
        sys.exit(1)


if __name__ == "__main__":
    main(resolve_config(globals(), rules=RULES))
