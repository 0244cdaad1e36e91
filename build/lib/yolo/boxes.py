"""Box conventions shared by the whole package.

Three coordinate systems meet here:

* VOC pixels: x1, y1, x2, y2 as written in VOC annotations, 1-based and inclusive, so a box
  covering the single top-left pixel is (1, 1, 1, 1) and its width is x2 - x1 + 1.
* normalised: continuous x1, y1, x2, y2 as fractions of the image width and height, in [0, 1].
  The VOC box (x1, y1, x2, y2) covers the continuous interval [x1 - 1, x2], hence the conversions below.
* cell: the model's [x, y, w, h] per predictor, x and y the box centre as an offset inside its grid
  cell, w and h relative to the whole image.
"""
import torch


def voc_to_normalized(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """VOC 1-based inclusive pixel boxes (..., 4) -> normalised continuous boxes."""
    scale = boxes.new_tensor([width, height, width, height])
    offset = boxes.new_tensor([1.0, 1.0, 0.0, 0.0])
    return (boxes - offset) / scale


def normalized_to_voc(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """Normalised continuous boxes (..., 4) -> VOC 1-based inclusive pixel boxes."""
    scale = boxes.new_tensor([width, height, width, height])
    offset = boxes.new_tensor([1.0, 1.0, 0.0, 0.0])
    return boxes * scale + offset


def at_least_one_pixel(boxes: torch.Tensor) -> torch.Tensor:
    """VOC pixel boxes (..., 4) with x2 >= x1 and y2 >= y1: a box under one pixel wide or high (a decoded
    detection can be, and then x2 < x1) is widened to one pixel, so it can be drawn and read."""
    return torch.cat([boxes[..., :2], torch.maximum(boxes[..., 2:], boxes[..., :2])], dim=-1)


def cell_to_normalized(cell_boxes: torch.Tensor) -> torch.Tensor:
    """Cell-relative [x, y, w, h] of shape (..., S, S, B, 4) -> normalised x1, y1, x2, y2.

    The grid is read from the two dimensions before the predictor dimension, so the same code
    decodes predictions (N, S, S, B, 4) and targets (N, S, S, 1, 4).
    """
    grid_size = cell_boxes.shape[-3]
    cells = torch.arange(grid_size, device=cell_boxes.device, dtype=cell_boxes.dtype)
    # Row index i is y, column index j is x.
    offset_x = cells.view(1, grid_size, 1)
    offset_y = cells.view(grid_size, 1, 1)
    centre_x = (cell_boxes[..., 0] + offset_x) / grid_size
    centre_y = (cell_boxes[..., 1] + offset_y) / grid_size
    half_w = cell_boxes[..., 2] / 2
    half_h = cell_boxes[..., 3] / 2
    return torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h), dim=-1)


def paired_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of corresponding continuous x1, y1, x2, y2 boxes, broadcast over the leading dimensions."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(dim=-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(dim=-1)
    return intersection / (area1 + area2 - intersection + eps)
