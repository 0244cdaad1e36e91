"""Detection from Python: a trained YOLOv1 that takes images in any common form and answers in their pixels.

    import yolo

    detector = yolo.load_detector("runs/resnet18_voc2012val/last.pt")
    for result in detector.predict(["street.jpg", "kitchen.png"]):   # a list of images: a list of results
        for box, score, name in zip(result.boxes.tolist(), result.scores.tolist(), result.names):
            print(f"{name} {score:.2f} at {[round(value) for value in box]}")
    detector.predict("street.jpg").save("street_boxes.jpg")          # one image: one result, drawn

Boxes are x1, y1, x2, y2 in the original image's pixels, continuous and 0-based (torchvision's convention):
(0, 0) is the top-left corner of the image and (width, height) its bottom-right corner, so a box scales with
the image. The VOC annotations' 1-based inclusive pixels, which evaluate.py and detect.py write, are
x1 + 1, y1 + 1, x2, y2.

`export_weights` turns a run's checkpoint into a file to share: its weights in fp16 (half the size) with
what rebuilds the model, named by its SHA-256 as torchvision names its weights.
"""
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from yolo.boxes import normalized_to_voc
from yolo.checkpoint import CheckpointError, load_model
from yolo.data import decode_image
from yolo.device import resolve_device
from yolo.files import atomic_write
from yolo.inference import Detector, preprocess
from yolo.model import YOLOv1
from yolo.postprocess import DISPLAY_SCORE_THRESHOLD, MAX_DETECTIONS, NMS_IOU, select_detections
from yolo.visualize import draw_boxes

ACCEPTED_IMAGES = ("a path, a PIL image, a NumPy (H, W, 3) RGB array, or a (3, H, W) or (H, W, 3) RGB tensor, "
                   "of uint8 or of floats in [0, 1]; or a list of these")
# What a weights file keeps of a checkpoint besides the weights: what rebuilds the model and says where it came from.
WEIGHTS_FILE_KEYS = ("model_args", "class_names", "config", "epoch", "git_commit")


@dataclass
class Detections:
    """One image's detections, best first."""
    boxes: torch.Tensor   # (K, 4) float32 x1, y1, x2, y2 in the image's pixels (continuous, 0-based)
    scores: torch.Tensor  # (K,) float32 class-specific confidence: box confidence x class probability
    labels: torch.Tensor  # (K,) int64 class indices: the model's outputs, 0 to C - 1 in class_names' order
    names: list[str]      # the K class names
    class_ids: list | None  # the K classes' ids in the training set's files (COCO category ids, the keys of a
                            # YOLO data.yaml's names, VOC's place in classes.txt from 1); None where the model
                            # file does not say them (a checkpoint from before they were kept)
    source: object        # the image as it was given to predict, which plot() draws on

    def __len__(self) -> int:
        return len(self.scores)

    def plot(self, line_width: int = 2) -> PIL.Image.Image:
        """The image with its boxes drawn, each captioned with its class name and score."""
        image = as_image(self.source).cpu()
        # draw_boxes takes VOC's 1-based pixels; continuous pixels are normalised coordinates at a scale of 1.
        names = dict(zip(self.labels.tolist(), self.names))  # draw_boxes looks names up by class index
        drawn = draw_boxes(image, normalized_to_voc(self.boxes, 1.0, 1.0), self.labels, names, self.scores,
                           width=line_width)
        return PIL.Image.fromarray(drawn.permute(1, 2, 0).numpy())

    def save(self, path: str | os.PathLike, line_width: int = 2) -> Path:
        """Write plot()'s image to `path` (the format follows its extension; folders are made) and return it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.plot(line_width).save(path)
        return path


def image_layout_error(shape: tuple, layouts: str) -> ValueError:
    hint = {2: " (a grayscale image: repeat it to 3 channels)"}.get(len(shape), "")
    if len(shape) == 3 and 4 in (shape[0], shape[-1]):
        hint = " (RGBA: drop the alpha channel)"
    return ValueError(f"an image of shape {shape}: expected {layouts}{hint}. Accepted: {ACCEPTED_IMAGES}.")


def as_image(image) -> torch.Tensor:
    """Any accepted image as the uint8 (3, H, W) RGB tensor the detector reads.

    A path or a PIL image is taken as displayed (its EXIF orientation applied); arrays and tensors as they are.
    Floats are rounded to 8 bits, the precision of the images the model was trained on.
    """
    if isinstance(image, (str, os.PathLike)):
        return decode_image(image)
    if isinstance(image, PIL.Image.Image):
        return torch.from_numpy(np.array(PIL.ImageOps.exif_transpose(image).convert("RGB"))).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise image_layout_error(image.shape, "(H, W, 3) for a NumPy array")
        image = torch.from_numpy(image.copy()).permute(2, 0, 1)  # a copy: NumPy allows negative strides, torch not
    elif isinstance(image, torch.Tensor):
        if image.dim() != 3 or 3 not in (image.shape[0], image.shape[2]):
            raise image_layout_error(tuple(image.shape), "(3, H, W) or (H, W, 3) for a tensor")
        image = image.detach()  # on its device: preprocess moves it to the detector's, once
        image = image if image.shape[0] == 3 else image.permute(2, 0, 1)
    else:
        raise TypeError(f"cannot read an image from a {type(image).__name__}. Accepted: {ACCEPTED_IMAGES}.")
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise TypeError(f"an image of dtype {str(image.dtype).removeprefix('torch.')}: expected uint8, or floats in "
                        f"[0, 1]. Accepted: {ACCEPTED_IMAGES}.")
    image = image.float()
    if image.numel() and not (image.min() >= 0 and image.max() <= 1):
        raise ValueError(f"a float image with values from {image.min():g} to {image.max():g}: floats must be in "
                         f"[0, 1] (divide 0-255 values by 255, or pass them as uint8).")
    return image.mul(255).round_().to(torch.uint8)


def is_image_list(images) -> bool:
    """Whether `predict`'s argument holds several images (a list or tuple, or a 4-D batch) or is a single one."""
    return isinstance(images, (list, tuple)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)


class ImageDetector:
    """A trained YOLOv1 in inference mode (see `yolo.inference.Detector`) with its class names.

    `model`: a YOLOv1, run in PyTorch on `device` in `dtype`, or a ready Detector (`open_detector`'s, which runs
    an .onnx file in ONNX Runtime), used as it is. `class_ids`: each class's id in the training set's files.
    """

    def __init__(self, model: YOLOv1 | Detector, class_names: Sequence[str], device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", class_ids: Sequence | None = None):
        if isinstance(model, Detector):
            self.detector = model
        else:
            device = resolve_device(device) if isinstance(device, str) else torch.device(device)
            self.detector = Detector(model, dtype, device)
        self.class_names = list(class_names)
        self.class_ids = None if class_ids is None else list(class_ids)
        if self.class_ids is not None and len(self.class_ids) != len(self.class_names):
            raise ValueError(f"{len(self.class_ids)} class ids for {len(self.class_names)} class names: give one "
                             f"id per class, in the same order")

    @torch.inference_mode()
    def predict(self, images, score_threshold: float = DISPLAY_SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
                max_detections: int = MAX_DETECTIONS, batch_size: int = 8) -> Detections | list[Detections]:
        """A single image's `Detections`, or for a list or a batch one `Detections` per image, in order.

        `images`: a path, a PIL image, a NumPy (H, W, 3) RGB array or a (3, H, W) or (H, W, 3) RGB tensor (uint8,
        or floats in [0, 1]); or a list or tuple mixing them, or a 4-D batch (N, 3, H, W) or (N, H, W, 3).
        OpenCV's arrays are BGR: pass image[..., ::-1]. The default score threshold is the one for showing
        detections; mAP wants nearly all (evaluate.py's 0.005). `batch_size` images go through the network at a
        time.
        """
        several = is_image_list(images)
        images, results = list(images) if several else [images], []
        for start in range(0, len(images), batch_size):
            sources = images[start:start + batch_size]
            group = [as_image(image) for image in sources]
            batch = preprocess(group, self.detector.image_size, self.detector.input_dtype, self.detector.device)
            _, boxes, scores = self.detector.infer(batch)
            decoded = select_detections(boxes, scores, score_threshold, nms_iou, max_detections)
            for source, image, detection in zip(sources, group, decoded):
                height, width = image.shape[1:]
                labels = detection["labels"].cpu().tolist()
                results.append(Detections(
                    detection["boxes"].float().cpu() * torch.tensor([width, height] * 2),
                    detection["scores"].float().cpu(), torch.tensor(labels, dtype=torch.int64),
                    [self.class_names[label] for label in labels],
                    None if self.class_ids is None else [self.class_ids[label] for label in labels], source))
        return results if several else results[0]


def open_detector(path: str | os.PathLike, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                  **postprocess) -> tuple[Detector, dict]:
    """The Detector of a model file, and what the file says of the model: model_args, class_names, config (the
    training run's settings), epoch and git_commit where it has them.

    A train.py checkpoint or an export_weights.py file runs in PyTorch on `device` (auto: CUDA when available) in
    `dtype` (auto: see `inference_dtype`); an export.py `.onnx` file runs in ONNX Runtime on the CPU in fp32.
    `postprocess`: Detector's score_threshold, nms_iou and max_detections. A file that cannot be read as what
    its name says is a CheckpointError naming it.
    """
    if Path(path).suffix == ".onnx":
        try:
            from yolo.onnx_model import OnnxDetector  # onnxruntime is loaded only for an .onnx file
        except ImportError as error:
            raise CheckpointError(f"{path}: an .onnx file runs in ONNX Runtime, which this environment lacks "
                                  f"({error}); install the pinned requirements (pip install -r requirements.txt) "
                                  f"or pip install -e '.[onnx]'") from error
        detector = OnnxDetector(path, device, dtype, **postprocess)
        return detector, detector.state
    model, state = load_model(path)
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    return Detector(model, dtype, device, **postprocess), state


def load_detector(checkpoint: str | os.PathLike, device: str | torch.device = "auto",
                  dtype: str | torch.dtype = "auto") -> ImageDetector:
    """The detector of a train.py checkpoint (last.pt, best.pt), of a weights file from `export_weights` or of an
    export.py .onnx file, which ONNX Runtime runs on the CPU in fp32 (`device` auto or cpu, `dtype` auto or fp32).

    `device`: auto (CUDA when available, else the CPU) | cpu | cuda | cuda:N. `dtype`: auto (bf16 where the
    device computes it natively, else fp32) | fp32 | bf16 | fp16.
    """
    # A weights file's fp16 weights load into the fp32 model as fp32.
    detector, state = open_detector(checkpoint, device, dtype)
    # The training run's settings keep the classes' ids in its files (in checkpoints since they were kept at all).
    return ImageDetector(detector, state["class_names"], class_ids=state.get("config", {}).get("class_ids"))


def export_weights(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a checkpoint's weights file to out_dir and return its path, `<run>_<checkpoint>-<sha256[:8]>.pth`.

    It holds the model's parameters in fp16 (half the bytes; BatchNorm's running statistics stay fp32, being
    few and of any range) and the checkpoint's model_args, class_names, config, epoch and git_commit. The
    name's hash is the file's, as torch.hub.load_state_dict_from_url(check_hash=True) checks it.
    """
    checkpoint = Path(checkpoint)
    model, state = load_model(checkpoint)
    parameters = dict(model.named_parameters())
    weights = {name: tensor.half() if name in parameters else tensor for name, tensor in model.state_dict().items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{checkpoint.resolve().parent.name}_{checkpoint.stem}"
    data = io.BytesIO()  # the name holds the bytes' hash: made in memory first
    torch.save({"model": weights, **{key: state[key] for key in WEIGHTS_FILE_KEYS if key in state}}, data)
    path = out_dir / f"{stem}-{hashlib.sha256(data.getbuffer()).hexdigest()[:8]}.pth"
    with atomic_write(path) as file:
        file.write(data.getbuffer())
    return path
