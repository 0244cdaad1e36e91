"""From the network's output to detections: class-specific scores, class-wise NMS, VOC pixel boxes."""
import numpy as np
import torch
from torchvision.ops import batched_nms

from yolo.boxes import at_least_one_pixel, cell_to_normalized, normalized_to_voc

# The post-processing settings of every script (SPEC section 6); the scripts expose them as constants.
EVAL_SCORE_THRESHOLD = 0.005  # keeps nearly everything: mAP integrates over all scores
DISPLAY_SCORE_THRESHOLD = 0.2  # what detect.py draws and evaluate.py's example figures show
NMS_IOU = 0.5                  # class-wise NMS suppresses a box overlapping a better one by more than this
MAX_DETECTIONS = 100           # detections kept per image (the COCO evaluation counts 100)


def decode_boxes_and_scores(pred: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every candidate of pred (N, S, S, 5B + C): each predictor's box in normalised x1, y1, x2, y2 clipped to the
    image, (N, S*S*B, 4), and its score for each class, conf x p(class) (the paper's class-specific confidence),
    (N, S*S*B, C). Candidates are in cell order (row, column), then predictor. An exported .onnx graph returns
    these two (export.py): NMS on them (`select_detections`) gives the PyTorch path's detections.
    """
    batch_size, num_boxes = pred.shape[0], (pred.shape[-1] - num_classes) // 5
    pred = pred.float()
    predictors = pred[..., :5 * num_boxes].unflatten(-1, (num_boxes, 5))
    boxes = cell_to_normalized(predictors[..., :4]).clamp(0.0, 1.0).reshape(batch_size, -1, 4)
    class_probs = pred[..., 5 * num_boxes:].unsqueeze(3)
    scores = (predictors[..., 4].unsqueeze(-1) * class_probs).reshape(batch_size, -1, num_classes)
    return boxes, scores


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float = EVAL_SCORE_THRESHOLD,
                      nms_iou: float = NMS_IOU, max_detections: int = MAX_DETECTIONS) -> list[dict[str, torch.Tensor]]:
    """Detections per image from candidate boxes (N, M, 4) and scores (N, M, C) (`decode_boxes_and_scores`).

    Every (candidate, class) pair is a detection, so one cell can report several classes. Pairs above
    `score_threshold` go through NMS per image and class, and each image keeps its `max_detections` best.
    Returns one dict per image with `boxes` (K, 4), `scores` (K,) and `labels` (K,), sorted by descending score.
    """
    batch_size, num_classes = scores.shape[0], scores.shape[-1]
    image_index, box_index, labels = torch.nonzero(scores > score_threshold, as_tuple=True)
    candidate_scores = scores[image_index, box_index, labels]
    candidate_boxes = boxes[image_index, box_index]
    keep = batched_nms(candidate_boxes, candidate_scores, image_index * num_classes + labels, nms_iou)
    # batched_nms returns descending scores; a stable sort by image keeps that order within each image.
    keep = keep[torch.sort(image_index[keep], stable=True).indices]
    kept_images = image_index[keep]
    counts = torch.bincount(kept_images, minlength=batch_size)
    first_of_image = torch.cumsum(counts, 0) - counts
    rank = torch.ones_like(keep).cumsum(0) - 1 - first_of_image[kept_images]  # 0, 1, ... on keep's device
    keep = keep[rank < max_detections]
    counts = counts.clamp(max=max_detections).tolist()
    return [
        {"boxes": b, "scores": s, "labels": l}
        for b, s, l in zip(candidate_boxes[keep].split(counts), candidate_scores[keep].split(counts),
                           labels[keep].split(counts))
    ]


def decode_predictions(pred: torch.Tensor, num_classes: int, score_threshold: float = EVAL_SCORE_THRESHOLD,
                       nms_iou: float = NMS_IOU, max_detections: int = MAX_DETECTIONS) -> list[dict[str, torch.Tensor]]:
    """Detections per image from pred (N, S, S, 5B + C), in normalised x1, y1, x2, y2 clipped to the image:
    `select_detections` of `decode_boxes_and_scores`."""
    return select_detections(*decode_boxes_and_scores(pred, num_classes), score_threshold, nms_iou, max_detections)


def to_voc_arrays(detections: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Each image's detections (`select_detections`) as the metrics' (K, 6) array, VOC pixel x1, y1, x2, y2,
    score, class id, for images of those (height, width) sizes. The batch's detections cross to the host in one
    copy: on a GPU, one wait for the batch instead of three per image."""
    if not detections:
        return []
    packed = torch.cat([torch.cat([found["boxes"].double(), found["scores"].double()[:, None],
                                   found["labels"].double()[:, None]], dim=1) for found in detections]).cpu()
    parts = packed.split([len(found["scores"]) for found in detections])
    return [torch.cat([normalized_to_voc(part[:, :4], width, height), part[:, 4:]], dim=1).numpy()
            for part, (height, width) in zip(parts, sizes)]


def widen_sub_pixel_boxes(detections: np.ndarray) -> np.ndarray:
    """The detections with boxes under one pixel widened to one pixel (x1 <= x2, y1 <= y2)."""
    detections = detections.copy()
    detections[:, :4] = at_least_one_pixel(torch.from_numpy(detections[:, :4])).numpy()
    return detections


def detection_rows(source: str, frame: int, detections: np.ndarray, class_names: list[str]) -> list[dict]:
    """One dict per detection of a (K, 6) array, as detect.py's detections files and serve.py's answers give them.
    """
    # Unrounded: a box rounded to 0.1 px already moves AP50 in the third decimal.
    return [{"source": source, "frame": frame, "x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2),
             "score": float(score),
             "class_id": int(label), "class_name": class_names[int(label)]}
            for x1, y1, x2, y2, score, label in detections]
