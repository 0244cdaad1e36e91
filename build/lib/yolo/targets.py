"""YOLOv1 training targets: ground-truth boxes <-> the S x S x (5 + C) grid the loss compares against.

Layout per cell: [x, y, w, h, obj, one-hot class], x and y the box centre as an offset inside the cell,
w and h relative to the whole image (the same cell convention as `yolo.boxes.cell_to_normalized`).
A box belongs to the cell holding its centre. A cell holds at most one box: the largest by area wins,
the first listed on equal areas, and its class vector is one-hot (the seed wrote multi-hot vectors
when a box replaced another).
"""
import numpy as np
import torch

from yolo.boxes import cell_to_normalized


def encode_target(boxes: torch.Tensor, labels: torch.Tensor, grid_size: int, num_classes: int) -> torch.Tensor:
    """Normalised x1, y1, x2, y2 boxes (K, 4) and class indices (K,) -> float32 (S, S, 5 + C) target.

    Computed in NumPy on the CPU: it runs for every training image in the loader workers, and on a few boxes
    NumPy's cost per operation is a fraction of torch's. The arithmetic is float32 throughout, as in torch.
    """
    target = np.zeros((grid_size, grid_size, 5 + num_classes), dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    if len(boxes) == 0:
        return torch.from_numpy(target)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2 * grid_size
    # A centre exactly on the far edge (1.0) belongs to the last cell, not to a cell outside the grid.
    cells = np.minimum(np.floor(centres).astype(np.int64), grid_size - 1)
    flat_cells = cells[:, 1] * grid_size + cells[:, 0]
    sizes = boxes[:, 2:] - boxes[:, :2]

    # Deterministic "largest wins" without relying on scatter order with duplicate indices: sort the boxes by
    # cell, then by descending area (lexsort is stable: the earlier box wins a tie), and keep the first box of
    # each cell. The winners then have distinct cells and plain indexing is safe.
    grouped = np.lexsort((-(sizes[:, 0] * sizes[:, 1]), flat_cells))
    grouped_cells = flat_cells[grouped]
    first_in_cell = np.ones(len(grouped), dtype=bool)
    first_in_cell[1:] = grouped_cells[1:] != grouped_cells[:-1]
    winners = grouped[first_in_cell]

    rows, cols = cells[winners, 1], cells[winners, 0]
    target[rows, cols, 0:2] = centres[winners] - cells[winners]  # exact: a float32 minus its integer part
    target[rows, cols, 2:4] = sizes[winners]
    target[rows, cols, 4] = 1.0
    target[rows, cols, 5 + np.asarray(labels)[winners]] = 1.0
    return torch.from_numpy(target)


def decode_target(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S, 5 + C) target -> (normalised x1, y1, x2, y2 boxes (K, 4), class indices (K,)), row-major cells."""
    occupied = target[..., 4] != 0
    boxes = cell_to_normalized(target[..., None, :4])[..., 0, :]
    labels = target[..., 5:].argmax(dim=-1)
    return boxes[occupied], labels[occupied]
