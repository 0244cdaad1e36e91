"""Detection metrics: PASCAL VOC AP by the official devkit's rules, COCO AP by COCOeval's rules.

Inputs are one array per image, in VOC pixel coordinates (1-based, inclusive; see yolo/boxes.py):

* detections[i]:    (N, 6) x1, y1, x2, y2, score, class_id
* ground_truths[i]: (M, 6) x1, y1, x2, y2, class_id, difficult (0 or 1)

Both protocols match detections to ground truths greedily in score order, which is sequential by nature.
The reference implementations loop over every detection in Python (pycocotools takes tens of seconds on
VOC2012 val); here everything that does not depend on earlier matches (overlaps, best ground truth, sort
orders) is computed for all detections at once, and the greedy matching runs rank by rank over all images.

Ties are resolved as the references do: detections of equal score keep their input order (image order, then
order within the image), because both references sort with a stable sort.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Sequence

import numpy as np

from yolo.box_formats import voc_to_coco

VOC_IOU_THRESHOLD = 0.5
# Exactly these floats, as in the devkit's Python ports: 0.3 here is 0.30000000000000004.
VOC07_RECALL_THRESHOLDS = np.arange(0, 1.1, 0.1)
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
COCO_MAX_DETECTIONS = 100  # per image and class
COCO_AREA_RANGE = (0.0, 1e10)  # COCOeval's 'all'


class PrecisionRecall(NamedTuple):
    """One class's curve, one point per detection in descending score order (ignored ones included)."""

    recall: np.ndarray
    precision: np.ndarray


def evaluate_detections(
    detections: Sequence[np.ndarray], ground_truths: Sequence[np.ndarray], num_classes: int
) -> dict[str, float | np.ndarray]:
    """VOC2007 (11-point) and VOC2010+ (area) AP per class and their means, and COCO AP@[.5:.95], AP50, AP75.

    A class without a non-difficult ground truth has AP NaN and is left out of every mean; a class with ground
    truths but no detections has AP 0. If no class has a non-difficult ground truth, the means are NaN.
    """
    dets, gts = _flatten(detections, ground_truths, num_classes)
    pairs = _same_image_and_class_pairs(dets, gts, num_classes)
    curves = _voc_curves(dets, gts, pairs, num_classes)
    voc07_ap = np.array([np.nan if curve is None else _voc07_ap(curve) for curve in curves])
    voc12_ap = np.array([np.nan if curve is None else _voc12_ap(curve) for curve in curves])
    coco_precision = _coco_precision(dets, gts, pairs, num_classes)
    return {
        "voc07_map": _mean_over_classes_with_ground_truth(voc07_ap),
        "voc12_map": _mean_over_classes_with_ground_truth(voc12_ap),
        "voc07_ap": voc07_ap,
        "voc12_ap": voc12_ap,
        "coco_map": _coco_mean(coco_precision),
        "coco_ap50": _coco_mean(coco_precision[COCO_IOU_THRESHOLDS == 0.5]),
        "coco_ap75": _coco_mean(coco_precision[COCO_IOU_THRESHOLDS == 0.75]),
    }


def voc_precision_recall(
    detections: Sequence[np.ndarray], ground_truths: Sequence[np.ndarray], num_classes: int
) -> list[PrecisionRecall | None]:
    """The devkit's per-class precision/recall curves; None for a class without a non-difficult ground truth.

    A detection ignored because it matches a difficult ground truth keeps its point, repeating the previous
    recall and precision, as in VOCevaldet.m. Precision 0/0 (only ignored detections so far) is 0, as in the
    devkit's Python ports; MATLAB's NaN there is skipped by its max(), which gives the same APs except when
    every detection of a class is ignored (MATLAB: VOC2007 AP NaN; here 0).
    """
    dets, gts = _flatten(detections, ground_truths, num_classes)
    return _voc_curves(dets, gts, _same_image_and_class_pairs(dets, gts, num_classes), num_classes)


@dataclass(frozen=True)
class _Detections:
    image: np.ndarray  # (N,) image index
    boxes: np.ndarray  # (N, 4) VOC pixels
    scores: np.ndarray
    classes: np.ndarray

    @cached_property
    def by_class_then_score(self) -> np.ndarray:
        """Indices by class, then descending score; the sorts are stable, so equal scores keep input order."""
        by_score = np.argsort(-self.scores, kind="stable")
        return by_score[np.argsort(self.classes[by_score], kind="stable")]


@dataclass(frozen=True)
class _GroundTruths:
    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    difficult: np.ndarray  # bool


@dataclass(frozen=True)
class _Pairs:
    """Every (detection, ground truth) pair of the same image and class, by detection, then GT input order."""

    det: np.ndarray
    gt: np.ndarray
    slot: np.ndarray  # the GT's position among the GTs of its image and class, in input order


def _flatten(detections, ground_truths, num_classes) -> tuple[_Detections, _GroundTruths]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if len(detections) != len(ground_truths):
        raise ValueError(f"detections has {len(detections)} images but ground_truths has {len(ground_truths)}")
    det, det_image = _stack(detections, "detections", "x1, y1, x2, y2, score, class_id")
    gt, gt_image = _stack(ground_truths, "ground_truths", "x1, y1, x2, y2, class_id, difficult")

    for rows, image, name, class_column in ((det, det_image, "detections", 5), (gt, gt_image, "ground_truths", 4)):
        _require(np.isfinite(rows).all(axis=1), image, name, "holds a non-finite value")
        # A negative width has no meaning as a box and would break both overlap formulas.
        _require((rows[:, 2] - rows[:, 0] + 1 >= 0) & (rows[:, 3] - rows[:, 1] + 1 >= 0), image, name,
                 "has a box with x2 - x1 + 1 < 0 or y2 - y1 + 1 < 0")
        class_id = rows[:, class_column]
        _require((class_id == np.round(class_id)) & (class_id >= 0) & (class_id < num_classes), image, name,
                 f"has a class_id outside 0..{num_classes - 1}")
    _require(np.isin(gt[:, 5], (0, 1)), gt_image, "ground_truths", "has a difficult flag other than 0 or 1")

    return (
        _Detections(det_image, det[:, :4], det[:, 4], det[:, 5].astype(np.int64)),
        _GroundTruths(gt_image, gt[:, :4], gt[:, 4].astype(np.int64), gt[:, 5] == 1),
    )


def _stack(per_image: Sequence[np.ndarray], name: str, columns: str) -> tuple[np.ndarray, np.ndarray]:
    """All images' rows in one (N, 6) array, and each row's image index."""
    arrays = []
    for i, array in enumerate(per_image):
        rows = np.asarray(array, dtype=np.float64)
        if rows.size == 0:
            rows = rows.reshape(0, 6)
        elif rows.ndim != 2 or rows.shape[1] != 6:
            raise ValueError(f"{name}[{i}] has shape {rows.shape}; expected (N, 6): {columns}")
        arrays.append(rows)
    image = np.repeat(np.arange(len(arrays)), [len(rows) for rows in arrays])
    return (np.concatenate(arrays) if arrays else np.zeros((0, 6))), image


def _require(ok: np.ndarray, image: np.ndarray, name: str, problem: str) -> None:
    if not ok.all():
        raise ValueError(f"{name}[{image[np.argmin(ok)]}] {problem}")


def _same_image_and_class_pairs(dets: _Detections, gts: _GroundTruths, num_classes: int) -> _Pairs:
    det_groups = dets.image * num_classes + dets.classes
    gt_groups = gts.image * num_classes + gts.classes
    gt_order = np.argsort(gt_groups, kind="stable")
    first = np.searchsorted(gt_groups[gt_order], det_groups)
    count = np.searchsorted(gt_groups[gt_order], det_groups, side="right") - first
    det = np.repeat(np.arange(len(det_groups)), count)
    slot = np.arange(len(det)) - np.repeat(np.cumsum(count) - count, count)
    return _Pairs(det, gt_order[np.repeat(first, count) + slot], slot)


def _class_bounds(sorted_classes: np.ndarray, num_classes: int) -> np.ndarray:
    return np.searchsorted(sorted_classes, np.arange(num_classes + 1))


# --- PASCAL VOC (VOCevaldet.m, VOCap.m) ----------------------------------------------------------------------


def _voc_iou(det_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """VOCevaldet.m's overlap of corresponding rows, -inf where the devkit skips the pair (no overlap)."""
    dx1, dy1, dx2, dy2 = det_boxes.T
    gx1, gy1, gx2, gy2 = gt_boxes.T
    inter_w = np.minimum(dx2, gx2) - np.maximum(dx1, gx1) + 1
    inter_h = np.minimum(dy2, gy2) - np.maximum(dy1, gy1) + 1
    overlaps = (inter_w > 0) & (inter_h > 0)
    union = (dx2 - dx1 + 1) * (dy2 - dy1 + 1) + (gx2 - gx1 + 1) * (gy2 - gy1 + 1) - inter_w * inter_h
    return np.where(overlaps, inter_w * inter_h / np.where(overlaps, union, 1.0), -np.inf)


def _voc_best_ground_truth(
    dets: _Detections, gts: _GroundTruths, pairs: _Pairs
) -> tuple[np.ndarray, np.ndarray]:
    """Per detection: the highest overlap with a GT of its image and class (-inf if none), and that GT.

    The devkit updates its best only on a strictly greater overlap, so the first GT at the maximum wins.
    """
    best_iou = np.full(len(dets.scores), -np.inf)
    best_gt = np.zeros(len(dets.scores), dtype=np.int64)
    if len(pairs.det) == 0:
        return best_iou, best_gt
    iou = _voc_iou(dets.boxes[pairs.det], gts.boxes[pairs.gt])
    starts = np.flatnonzero(np.r_[True, pairs.det[1:] != pairs.det[:-1]])
    segment_max = np.maximum.reduceat(iou, starts)
    at_max = np.flatnonzero(iou == np.repeat(segment_max, np.diff(np.r_[starts, len(iou)])))
    first_at_max = at_max[np.r_[True, pairs.det[at_max][1:] != pairs.det[at_max][:-1]]]
    best_iou[pairs.det[first_at_max]] = iou[first_at_max]
    best_gt[pairs.det[first_at_max]] = pairs.gt[first_at_max]
    return best_iou, best_gt


def _voc_curves(
    dets: _Detections, gts: _GroundTruths, pairs: _Pairs, num_classes: int
) -> list[PrecisionRecall | None]:
    best_iou, best_gt = _voc_best_ground_truth(dets, gts, pairs)
    hit = best_iou >= VOC_IOU_THRESHOLD
    # The best GT being difficult makes the detection "don't care", even if a second-best GT would match.
    ignored = np.zeros_like(hit)
    ignored[hit] = gts.difficult[best_gt[hit]]
    order = dets.by_class_then_score
    claimants = order[(hit & ~ignored)[order]]
    # Of the detections claiming one GT, the first in score order takes it; the later ones are duplicates (FP).
    _, first_claims = np.unique(best_gt[claimants], return_index=True)
    true_positive = np.zeros(len(dets.scores), dtype=bool)
    true_positive[claimants[first_claims]] = True
    false_positive = ~true_positive & ~ignored

    positives = np.bincount(gts.classes[~gts.difficult], minlength=num_classes)
    bounds = _class_bounds(dets.classes[order], num_classes)
    curves: list[PrecisionRecall | None] = []
    for c in range(num_classes):
        if positives[c] == 0:
            curves.append(None)
            continue
        ranked = order[bounds[c] : bounds[c + 1]]
        tp, fp = np.cumsum(true_positive[ranked]), np.cumsum(false_positive[ranked])
        precision = tp / np.maximum(tp + fp, 1)  # counts: 0 / 1 = 0 where only ignored detections came so far
        curves.append(PrecisionRecall(tp / positives[c], precision))
    return curves


def _voc07_ap(curve: PrecisionRecall) -> float:
    """Mean over t in 0, 0.1, ..., 1 of the highest precision at recall >= t (0 if recall never reaches t)."""
    best_from = np.append(np.maximum.accumulate(curve.precision[::-1])[::-1], 0.0)
    # Recall never decreases, so the points with recall >= t are a suffix starting here.
    return float(np.mean(best_from[np.searchsorted(curve.recall, VOC07_RECALL_THRESHOLDS)]))


def _voc12_ap(curve: PrecisionRecall) -> float:
    """VOCap.m: area under the precision envelope (precision made non-increasing in recall)."""
    recall = np.concatenate(([0.0], curve.recall, [1.0]))
    envelope = np.maximum.accumulate(np.concatenate(([0.0], curve.precision, [0.0]))[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * envelope[steps]))


def _mean_over_classes_with_ground_truth(ap: np.ndarray) -> float:
    return float(np.mean(ap[~np.isnan(ap)])) if not np.isnan(ap).all() else math.nan


# --- COCO (pycocotools' COCOeval, iouType 'bbox', area 'all', maxDets 100) -------------------------------------


def _coco_precision(dets: _Detections, gts: _GroundTruths, pairs: _Pairs, num_classes: int) -> np.ndarray:
    """COCOeval.accumulate's precision (T, R, K); -1 for a class without a counted (non-ignored) GT."""
    det_xywh, gt_xywh = voc_to_coco(dets.boxes), voc_to_coco(gts.boxes)
    crowd = gts.difficult
    gt_ignored = crowd | _outside_area_range(gt_xywh)
    rank = _coco_ranks(dets, num_classes)
    kept = rank < COCO_MAX_DETECTIONS
    in_play = kept[pairs.det]
    pairs = _Pairs(pairs.det[in_play], pairs.gt[in_play], pairs.slot[in_play])
    iou = _coco_iou(det_xywh[pairs.det], gt_xywh[pairs.gt], crowd[pairs.gt])
    matched, matched_ignored = _coco_matches(dets, pairs, iou, rank, crowd, gt_ignored, num_classes)
    ignored = matched_ignored | (~matched & _outside_area_range(det_xywh)[:, None])
    positives = np.bincount(gts.classes[~gt_ignored])

    # COCOeval.accumulate concatenates images in order and merge-sorts by score: the same stable class order.
    order = dets.by_class_then_score[kept[dets.by_class_then_score]]
    counted = ~ignored[order]
    true_positive, false_positive = matched[order] & counted, ~matched[order] & counted
    bounds = _class_bounds(dets.classes[order], num_classes)
    precision = -np.ones((len(COCO_IOU_THRESHOLDS), len(COCO_RECALL_THRESHOLDS), num_classes))
    for c in np.flatnonzero(positives):
        tp = np.cumsum(true_positive[bounds[c] : bounds[c + 1]], axis=0)
        fp = np.cumsum(false_positive[bounds[c] : bounds[c + 1]], axis=0)
        recall = tp / positives[c]
        envelope = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[::-1])[::-1]
        # Recall thresholds beyond the last recall reached get precision 0.
        envelope = np.concatenate([envelope, np.zeros((1, len(COCO_IOU_THRESHOLDS)))])
        for t in range(len(COCO_IOU_THRESHOLDS)):
            precision[t, :, c] = envelope[np.searchsorted(recall[:, t], COCO_RECALL_THRESHOLDS), t]
    return precision


def _outside_area_range(xywh: np.ndarray) -> np.ndarray:
    area = xywh[:, 2] * xywh[:, 3]
    return (area < COCO_AREA_RANGE[0]) | (area > COCO_AREA_RANGE[1])


def _coco_iou(det_xywh: np.ndarray, gt_xywh: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """maskApi.c's bbIou on corresponding rows, operation for operation; a crowd GT's union is the det's area."""
    dx, dy, dw, dh = det_xywh.T
    gx, gy, gw, gh = gt_xywh.T
    inter_w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    inter_h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    overlaps = (inter_w > 0) & (inter_h > 0)
    inter = inter_w * inter_h
    union = np.where(crowd, dw * dh, dw * dh + gw * gh - inter)
    return np.where(overlaps, inter / np.where(overlaps, union, 1.0), 0.0)


def _coco_ranks(dets: _Detections, num_classes: int) -> np.ndarray:
    """Each detection's position in its image and class by descending score (COCOeval's mergesort)."""
    # Regrouping the class order by image, stably, gives the order by image, class, then score.
    order = dets.by_class_then_score[np.argsort(dets.image[dets.by_class_then_score], kind="stable")]
    groups = (dets.image * num_classes + dets.classes)[order]
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order)) - np.searchsorted(groups, groups)
    return rank


def _coco_matches(
    dets: _Detections, pairs: _Pairs, iou: np.ndarray, rank: np.ndarray, crowd: np.ndarray,
    gt_ignored: np.ndarray, num_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.evaluateImg for every image and class: (N, T) flags matched, and matched to an ignored GT."""
    thresholds = COCO_IOU_THRESHOLDS  # all below 1, so COCOeval's min(t, 1 - 1e-10) is each t
    matched = np.zeros((len(dets.scores), len(thresholds)), dtype=bool)
    matched_ignored = np.zeros_like(matched)
    # A detection below the lowest threshold with every GT matches nothing: only the others enter the loop.
    reachable = iou >= thresholds.min()
    pair_det, pair_gt, slot, iou = pairs.det[reachable], pairs.gt[reachable], pairs.slot[reachable], iou[reachable]
    if len(iou) == 0:
        return matched, matched_ignored

    # Candidates in the order COCOeval visits them: by image and class, then by descending score.
    candidates = np.unique(pair_det)
    groups = dets.image[candidates] * num_classes + dets.classes[candidates]
    visit_order = np.lexsort((rank[candidates], groups))
    candidates, groups = candidates[visit_order], groups[visit_order]
    _, group, group_size = np.unique(groups, return_inverse=True, return_counts=True)
    turn = np.arange(len(candidates)) - np.repeat(np.cumsum(group_size) - group_size, group_size)

    # Dense per-candidate overlaps and per-group GT flags, one column per GT slot.
    row_of = np.empty(len(dets.scores), dtype=np.int64)
    row_of[candidates] = np.arange(len(candidates))
    pair_row, num_slots = row_of[pair_det], slot.max() + 1
    candidate_iou = np.full((len(candidates), num_slots), -np.inf)
    candidate_iou[pair_row, slot] = iou
    slot_ignored = np.zeros((len(group_size), num_slots), dtype=bool)
    slot_crowd = np.zeros_like(slot_ignored)
    slot_ignored[group[pair_row], slot] = gt_ignored[pair_gt]
    slot_crowd[group[pair_row], slot] = crowd[pair_gt]
    taken = np.zeros((len(group_size), len(thresholds), num_slots), dtype=bool)

    # Turn k handles the k-th candidate of every group, at every threshold, at once.
    by_turn = np.argsort(turn)  # a turn holds one row of each group at most: their order does not matter
    turn_bounds = np.searchsorted(turn[by_turn], np.arange(turn.max() + 2))
    for k in range(turn.max() + 1):
        rows = by_turn[turn_bounds[k] : turn_bounds[k + 1]]
        g = group[rows]
        row_iou = candidate_iou[rows][:, None, :]
        # "if this gt already matched, and not a crowd, continue"; equal overlaps go to the later GT ('>=').
        available = (row_iou >= thresholds[:, None]) & (~taken[g] | slot_crowd[g][:, None, :])
        regular = available & ~slot_ignored[g][:, None, :]
        fallback = available & slot_ignored[g][:, None, :]
        # Ignored GTs are sorted last and the scan stops at them once it holds a regular match, so they only
        # count when no regular GT matches.
        has_regular = regular.any(axis=-1)
        choice = np.where(has_regular, _last_argmax(row_iou, regular), _last_argmax(row_iou, fallback))
        hit_row, hit_t = np.nonzero(has_regular | fallback.any(axis=-1))
        taken[g[hit_row], hit_t, choice[hit_row, hit_t]] = True
        matched[candidates[rows[hit_row]], hit_t] = True
        matched_ignored[candidates[rows[hit_row]], hit_t] = ~has_regular[hit_row, hit_t]
    return matched, matched_ignored


def _last_argmax(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    masked = np.where(mask, values, -np.inf)
    return masked.shape[-1] - 1 - np.argmax(masked[..., ::-1], axis=-1)


def _coco_mean(precision: np.ndarray) -> float:
    """COCOeval.summarize: mean over every entry of the classes with a counted GT (the others hold -1)."""
    counted = precision[precision > -1]
    return float(np.mean(counted)) if counted.size else math.nan
