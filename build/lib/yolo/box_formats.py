"""The box conventions of other tools' annotation files, and their exact bridges to VOC pixels (SPEC section 12).

VOC pixels (yolo.boxes) are 1-based inclusive: the box x1..x2 covers the continuous interval [x1 - 1, x2].

* COCO: x, y, w, h in 0-based continuous pixels, (x, y) the top-left corner. The bridge is mmdetection's,
  x = x1 - 1, w = x2 - x1 + 1: whole-pixel boxes round-trip exactly; files from converters that write
  x = x1, w = x2 - x1 (globox, Roboflow) come out within a pixel.
* YOLO txt: the continuous box's centre cx, cy and size w, h divided by the image's width and height.

numpy only, without torch, so that data/make_synthetic.py starts in a fraction of a second.
"""
import numpy as np


def voc_to_coco(boxes: np.ndarray) -> np.ndarray:
    """VOC pixel boxes (M, 4) -> COCO x, y, w, h (M, 4), in the boxes' own dtype."""
    x1, y1, x2, y2 = np.asarray(boxes).reshape(-1, 4).T
    return np.stack([x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], axis=1)


def coco_to_voc(xywh: np.ndarray) -> np.ndarray:
    """COCO x, y, w, h (M, 4) -> VOC pixel boxes (M, 4)."""
    x, y, w, h = np.asarray(xywh).reshape(-1, 4).T
    return np.stack([x + 1, y + 1, x + w, y + h], axis=1)


def voc_to_yolo(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """VOC pixel boxes (M, 4) -> YOLO cx, cy, w, h (M, 4), float64."""
    x, y, w, h = voc_to_coco(np.asarray(boxes, dtype=np.float64)).T
    return np.stack([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height], axis=1)


def yolo_to_voc(cxcywh: np.ndarray, width: int, height: int) -> np.ndarray:
    """YOLO cx, cy, w, h (M, 4) -> VOC pixel boxes (M, 4), float64."""
    cx, cy, w, h = np.asarray(cxcywh, dtype=np.float64).reshape(-1, 4).T
    return coco_to_voc(np.stack([(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height], axis=1))
