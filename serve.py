"""Serve a trained model over HTTP: a page to drop images on and see their boxes, and a JSON API.

    python serve.py --checkpoint=runs/demo/resnet18/last.pt            # then open http://127.0.0.1:8000
    python serve.py --checkpoint=model.onnx --port=8080                 # export.py's file, run by ONNX Runtime
    curl -F image=@street.jpg 'http://127.0.0.1:8000/predict?score_threshold=0.3'

POST /predict answers one image's detections as detect.py's detections.json rows (VOC pixel coordinates, 1-based
inclusive), with the image's width and height, the batch it ran in and the request's milliseconds; GET /model
the model's name, classes and input size; GET /health {"status": "ok"}. docs/serving.md gives the API. The
requests that arrive together run as one batch. Bad input (not an image, a damaged one, one over the pixel or
size limit, an unknown or out-of-range parameter) gets a 4xx with a one-line `detail`. Ctrl-C stops it.

Needs the `serve` extra (pip install -e '.[serve]'; the pinned requirements have it). It listens on 127.0.0.1
only, unless `host` says otherwise: it has no authentication, so expose it only where anyone who can reach it
may use it.
"""
import socket
import sys
from pathlib import Path

import uvicorn

from yolo.api import open_detector
from yolo.checkpoint import CheckpointError
from yolo.config import at_least, between, format_config, one_of, resolve_config
from yolo.device import DTYPES, resolve_device
from yolo.serving import create_app

checkpoint = "runs/resnet18_voc2012val/last.pt"  # a train.py checkpoint, or an export.py .onnx (ONNX Runtime, CPU)
host = "127.0.0.1"             # address to listen on: 127.0.0.1 this machine only; 0.0.0.0 every network it is on;
                               # an IPv6 address (::1, ::) as well
port = 8000                    # TCP port; 0: any free one (the address is printed)
device = "auto"                # auto (cuda if available; an .onnx: cpu) | cpu | cuda
dtype = "fp32"                 # fp32 (detect.py's: the same detections) | bf16 | fp16 | auto; an .onnx: fp32
max_batch_size = 8             # images per forward pass, at least 1
batch_window_ms = 10.0         # how long an image waits for others to batch with when it would run alone, in ms
max_upload_mb = 20.0           # largest request body accepted, in MB (2**20 bytes); larger: 413
max_megapixels = 50.0          # largest image accepted, width x height in millions of pixels; larger: 413

RULES = {"device": resolve_device, "dtype": one_of("auto", *DTYPES), "port": between(0, 65535),
         "max_batch_size": at_least(1), "batch_window_ms": between(0.0, 1000.0), "max_upload_mb": at_least(0.001),
         "max_megapixels": at_least(0.001)}


def model_description(path: Path, state: dict, detector) -> dict:
    """What GET /model answers."""
    return {"name": f"{path.parent.name}/{path.name}", "checkpoint": str(path),
            "runtime": "onnxruntime" if path.suffix == ".onnx" else "pytorch",
            "device": str(detector.device), "dtype": str(detector.dtype).removeprefix("torch."),
            "backbone": state["model_args"].get("backbone"), "image_size": detector.image_size,
            "grid_size": detector.grid_size, "class_names": list(state["class_names"]),
            "epoch": state.get("epoch"), "git_commit": state.get("git_commit")}


def main(config: dict) -> None:
    path = Path(config["checkpoint"])
    try:
        detector, state = open_detector(path, config["device"], config["dtype"])
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    limits = ("max_batch_size", "batch_window_ms", "max_upload_mb", "max_megapixels")
    app = create_app(detector, model_description(path, state, detector), **{key: config[key] for key in limits})
    ipv6 = ":" in config["host"]
    try:
        listener = socket.create_server((config["host"], config["port"]),
                                        family=socket.AF_INET6 if ipv6 else socket.AF_INET)
    except OSError as error:
        sys.exit(f"error: cannot listen on {config['host']}:{config['port']} ({error.strerror}); choose another "
                 f"--port (0: any free one) or --host")
    address, bound_port = listener.getsockname()[:2]
    url_host = f"[{address}]" if ipv6 else address
    print(f"serving {path} ({detector.device}, {str(detector.dtype).removeprefix('torch.')}) at "
          f"http://{url_host}:{bound_port} (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[listener])


if __name__ == "__main__":
    settings = resolve_config(globals(), rules=RULES)
    print(format_config(settings), flush=True)
    main(settings)
