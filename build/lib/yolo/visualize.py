"""Drawing boxes on images, for eyeballing data, augmentation and detections."""
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from yolo.boxes import at_least_one_pixel

# Tableau-like palette, cycled by class index so a class keeps its colour across images.
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


def draw_boxes(image, boxes, labels, class_names, scores=None, colors=None, width=2):
    """Image uint8 (3, H, W) with boxes drawn and captioned "class" or "class 0.87"; returns a new uint8 image.

    boxes: (K, 4) VOC pixel coordinates (1-based inclusive x1, y1, x2, y2); convert normalised boxes
    with yolo.boxes.normalized_to_voc first. A box under one pixel is drawn as one pixel.
    colors: one per box, default a colour per class.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"draw_boxes needs a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")
    boxes = at_least_one_pixel(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    if len(boxes) == 0:
        return image.clone()
    labels = torch.as_tensor(labels).reshape(-1).tolist()
    captions = [class_names[label] for label in labels]
    if scores is not None:
        captions = [f"{caption} {score:.2f}" for caption, score in zip(captions, torch.as_tensor(scores).tolist())]
    if colors is None:
        colors = [PALETTE[label % len(PALETTE)] for label in labels]
    # draw_bounding_boxes takes 0-based pixel corners; VOC's are 1-based.
    return draw_bounding_boxes(image, boxes - 1, labels=captions, colors=colors, width=width)


def save_image(image, path):
    """Write a uint8 (3, H, W) image; the format follows the file extension."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)
