"""YOLOv1 training targets: ground-truth boxes <-> the S x S x (5 + C) grid the loss compares against.

Layout per cell: [x, y, w, h, obj, one-hot class], x and y the box centre as an offset inside the cell,
w and h relative to the whole image (the same cell convention as `yolo.boxes.cell_to_normalized`).
A box belongs to the cell holding its centre. A cell holds at most one box: the largest by area wins,
the first listed on equal areas, and its class vector is one-hot (the seed wrote multi-hot vectors
when a box replaced another).
"""
import torch

from yolo.boxes import cell_to_normalized


def encode_target(boxes: torch.Tensor, labels: torch.Tensor, grid_size: int, num_classes: int) -> torch.Tensor:
    """Normalised x1, y1, x2, y2 boxes (K, 4) and class indices (K,) -> float32 (S, S, 5 + C) target."""
    target = torch.zeros(grid_size, grid_size, 5 + num_classes)
    if boxes.numel() == 0:
        return target
    boxes = boxes.float()
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2 * grid_size
    # A centre exactly on the far edge (1.0) belongs to the last cell, not to a cell outside the grid.
    cells = centres.floor().long().clamp(0, grid_size - 1)
    flat_cells = cells[:, 1] * grid_size + cells[:, 0]

    # Deterministic "largest wins" without relying on scatter order with duplicate indices: order the
    # boxes by descending area (stable, so earlier wins ties), group them by cell (stable again), and
    # keep the first box of each group. The winners then have distinct cells and plain indexing is safe.
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
    by_area = torch.argsort(areas, descending=True, stable=True)
    grouped = by_area[torch.argsort(flat_cells[by_area], stable=True)]
    grouped_cells = flat_cells[grouped]
    first_in_cell = torch.ones_like(grouped_cells, dtype=torch.bool)
    first_in_cell[1:] = grouped_cells[1:] != grouped_cells[:-1]
    winners = grouped[first_in_cell]

    rows, cols = cells[winners, 1], cells[winners, 0]
    target[rows, cols, 0:2] = centres[winners] - cells[winners].float()
    target[rows, cols, 2:4] = boxes[winners, 2:] - boxes[winners, :2]
    target[rows, cols, 4] = 1.0
    target[rows, cols, 5 + labels[winners].long()] = 1.0
    return target


def decode_target(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S, 5 + C) target -> (normalised x1, y1, x2, y2 boxes (K, 4), class indices (K,)), row-major cells."""
    occupied = target[..., 4] > 0.5
    boxes = cell_to_normalized(target[..., None, :4])[..., 0, :]
    labels = target[..., 5:].argmax(dim=-1)
    return boxes[occupied], labels[occupied]
