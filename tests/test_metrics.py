"""yolo.metrics against an independent loop-by-loop devkit translation, against pycocotools, and by hand."""
import contextlib
import io
import warnings

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from yolo.metrics import evaluate_detections, voc_precision_recall

EMPTY = np.zeros((0, 6))


# --- independent references --------------------------------------------------------------------------------


def devkit_voc(detections, ground_truths, num_classes):
    """Straight translation of VOCevaldet.m and VOCap.m (and VOC2007's 11-point branch), one class at a time.

    Returns per class (ap07, ap12, recall list, precision list), or None for a class without a non-difficult GT.
    Precision 0/0 (only ignored detections so far) is taken as 0, the convention yolo.metrics documents.
    """
    results = []
    for cls in range(num_classes):
        gt, npos = [], 0
        for rows in ground_truths:
            objects = [row for row in np.asarray(rows).reshape(-1, 6).tolist() if int(row[4]) == cls]
            gt.append({"BB": [o[:4] for o in objects], "diff": [o[5] == 1 for o in objects],
                       "det": [False] * len(objects)})
            npos += sum(o[5] == 0 for o in objects)
        ids, confidence, BB = [], [], []
        for image, rows in enumerate(detections):
            for row in np.asarray(rows).reshape(-1, 6).tolist():
                if int(row[5]) == cls:
                    ids.append(image), confidence.append(row[4]), BB.append(row[:4])
        # MATLAB's sort(-confidence) is stable, so is Python's sorted.
        si = sorted(range(len(confidence)), key=lambda k: -confidence[k])
        nd = len(si)
        tp, fp = [0] * nd, [0] * nd
        for d in range(nd):
            i, bb = ids[si[d]], BB[si[d]]
            ovmax, jmax = -np.inf, None
            for j, bbgt in enumerate(gt[i]["BB"]):
                bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
                iw = bi[2] - bi[0] + 1
                ih = bi[3] - bi[1] + 1
                if iw > 0 and ih > 0:
                    ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                          + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1) - iw * ih)
                    ov = iw * ih / ua
                    if ov > ovmax:
                        ovmax, jmax = ov, j
            if ovmax >= 0.5:
                if not gt[i]["diff"][jmax]:
                    if not gt[i]["det"][jmax]:
                        tp[d] = 1
                        gt[i]["det"][jmax] = True
                    else:
                        fp[d] = 1
            else:
                fp[d] = 1
        if npos == 0:
            results.append(None)
            continue
        rec, prec, ctp, cfp = [], [], 0, 0
        for d in range(nd):
            ctp, cfp = ctp + tp[d], cfp + fp[d]
            rec.append(ctp / npos)
            prec.append(ctp / (ctp + cfp) if ctp + cfp else 0.0)
        ap07 = 0.0
        for t in np.arange(0, 1.1, 0.1):
            p = [pr for pr, r in zip(prec, rec) if r >= t]
            ap07 += (max(p) if p else 0.0) / 11
        mrec, mpre = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        ap12 = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])
        results.append((ap07, ap12, rec, prec))
    return results


def pycocotools_stats(detections, ground_truths, num_classes):
    """(AP@[.5:.95], AP50, AP75) from the real COCOeval on the SPEC's conversion; NaN where it reports -1."""
    def xywh(row):
        return [row[0] - 1, row[1] - 1, row[2] - row[0] + 1, row[3] - row[1] + 1]

    annotations = []
    for image, rows in enumerate(ground_truths):
        for row in np.asarray(rows).reshape(-1, 6).tolist():
            box = xywh(row)
            annotations.append({"id": len(annotations) + 1, "image_id": image + 1, "category_id": int(row[4]) + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": int(row[5])})
    results = [{"image_id": image + 1, "category_id": int(row[5]) + 1, "bbox": xywh(row), "score": row[4]}
               for image, rows in enumerate(detections) for row in np.asarray(rows).reshape(-1, 6).tolist()]
    if not results:
        return None  # pycocotools' loadRes crashes on an empty list
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": [{"id": i + 1} for i in range(len(ground_truths))],
                           "annotations": annotations, "categories": [{"id": c + 1} for c in range(num_classes)]}
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [np.nan if s == -1 else s for s in evaluator.stats[:3]]


def random_case(seed, num_classes=3, max_dets_per_image=8):
    """Small integer boxes, so overlap ties and IoU of exactly 0.5 happen; tied scores; duplicates; difficult."""
    rng = np.random.default_rng(seed)
    detections, ground_truths = [], []
    for _ in range(rng.integers(1, 6)):
        m = rng.integers(0, 5)
        x1, y1 = rng.integers(1, 16, (2, m))
        gt = np.column_stack([x1, y1, x1 + rng.integers(0, 12, m), y1 + rng.integers(0, 12, m),
                              rng.integers(0, num_classes, m), rng.random(m) < 0.25]).astype(float)
        n = rng.integers(0, max_dets_per_image + 1)
        # Some detections are jittered copies of GTs, mostly of the GT's class; the others lie anywhere.
        near = gt[rng.integers(0, m, rng.integers(0, n + 1))] if m else np.zeros((0, 6))
        anywhere = np.sort(rng.integers(1, 25, (n - len(near), 2, 2)), axis=1).reshape(-1, 4)
        boxes = np.concatenate([near[:, :4] + rng.integers(-2, 3, (len(near), 4)), anywhere])
        classes = rng.integers(0, num_classes, n)
        keep_class = rng.random(len(near)) < 0.8
        classes[: len(near)][keep_class] = near[keep_class, 4]
        det = np.column_stack([boxes, rng.choice([0.2, 0.5, 0.5, 0.9], n), classes])
        det[:, 2] = np.maximum(det[:, 2], det[:, 0])
        det[:, 3] = np.maximum(det[:, 3], det[:, 1])
        if n and rng.random() < 0.3:
            det = np.concatenate([det, det[rng.integers(0, n, 2)]])  # exact duplicates
        if rng.random() < 0.2:
            det[:, :4] += rng.choice([0.0, 0.25, 0.5], det[:, :4].shape)  # some non-integer coordinates
        detections.append(det if rng.random() > 0.1 else EMPTY)
        ground_truths.append(gt)
    return detections, ground_truths


# --- cross-checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(200))
def test_voc_matches_devkit_translation(seed):
    detections, ground_truths = random_case(seed, num_classes=4)
    ours = evaluate_detections(detections, ground_truths, 4)
    curves = voc_precision_recall(detections, ground_truths, 4)
    for cls, reference in enumerate(devkit_voc(detections, ground_truths, 4)):
        if reference is None:
            assert np.isnan(ours["voc07_ap"][cls]) and np.isnan(ours["voc12_ap"][cls]) and curves[cls] is None
            continue
        ap07, ap12, recall, precision = reference
        assert ours["voc07_ap"][cls] == pytest.approx(ap07, abs=1e-9)
        assert ours["voc12_ap"][cls] == pytest.approx(ap12, abs=1e-9)
        np.testing.assert_allclose(curves[cls].recall, recall, rtol=0, atol=1e-12)
        np.testing.assert_allclose(curves[cls].precision, precision, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(50))
def test_coco_matches_pycocotools(seed):
    detections, ground_truths = random_case(1000 + seed, max_dets_per_image=12)
    ours = evaluate_detections(detections, ground_truths, 3)
    expected = pycocotools_stats(detections, ground_truths, 3)
    if expected is None:
        has_gt = any(len(g) and (np.asarray(g)[:, 5] == 0).any() for g in ground_truths)
        expected = [0.0 if has_gt else np.nan] * 3
    got = [ours["coco_map"], ours["coco_ap50"], ours["coco_ap75"]]
    np.testing.assert_array_equal(got, expected)  # bit for bit: the same operations in the same order


def test_coco_keeps_top_100_per_image_and_class_like_pycocotools():
    # Image 0: 101 detections of class 0, all scored 0.5, so input order decides the cut. The hits on GTs A and
    # B are 98th and 100th and count; the hit on C is 101st and is dropped (VOC, which has no cut, counts it).
    gt = np.array([[1, 1, 10, 10, 0, 0], [21, 1, 30, 10, 0, 0], [41, 1, 50, 10, 0, 0]], dtype=float)
    misses = np.column_stack([np.arange(98) + 1.0, np.full(98, 100.0), np.arange(98) + 11, np.full(98, 110.0)])
    boxes = np.concatenate([misses[:97], gt[:1, :4], misses[97:], gt[1:, :4]])
    crowded = np.column_stack([boxes, np.full(101, 0.5), np.zeros(101)])
    # Image 1: a cloud of 150 detections around three GTs, with tied scores, mostly class 0.
    rng = np.random.default_rng(7)
    cloud_gt = np.array([[10, 10, 60, 60, 0, 0], [40, 40, 90, 90, 0, 0], [5, 5, 30, 30, 1, 1]], dtype=float)
    cloud_boxes = cloud_gt[rng.integers(0, 3, 150), :4] + rng.integers(-6, 7, (150, 4))
    cloud = np.column_stack([cloud_boxes, rng.choice([0.1, 0.3, 0.6, 0.8], 150), rng.random(150) < 0.2])
    detections, ground_truths = [crowded, cloud], [gt, cloud_gt]
    ours = evaluate_detections(detections, ground_truths, 2)
    got = [ours["coco_map"], ours["coco_ap50"], ours["coco_ap75"]]
    np.testing.assert_allclose(got, pycocotools_stats(detections, ground_truths, 2), rtol=0, atol=1e-9)
    crowded_only = evaluate_detections([crowded], [gt], 1)
    assert crowded_only["coco_ap50"] < crowded_only["voc12_map"]


def test_coco_area_range_like_pycocotools():
    # COCOeval's 'all' range stops at area 1e10: a bigger GT is ignored, a bigger unmatched detection too.
    huge = 200_000.0
    ground_truths = [np.array([[1, 1, huge, huge, 0, 0], [1, 1, 10, 10, 0, 0]])]
    detections = [np.array([[1, 1, huge, huge, 0.9, 0], [1, 1, 10, 10, 0.8, 0], [5, 5, huge, huge, 0.95, 0]])]
    ours = evaluate_detections(detections, ground_truths, 1)
    got = [ours["coco_map"], ours["coco_ap50"], ours["coco_ap75"]]
    np.testing.assert_allclose(got, pycocotools_stats(detections, ground_truths, 1), rtol=0, atol=1e-9)


# --- worked by hand ----------------------------------------------------------------------------------------


def test_perfect_detection_scores_one():
    gt = [np.array([[1, 1, 10, 10, 0, 0], [20, 20, 40, 30, 1, 0]], dtype=float)]
    det = [np.array([[1, 1, 10, 10, 0.9, 0], [20, 20, 40, 30, 0.8, 1]])]
    result = evaluate_detections(det, gt, 2)
    # COCOeval's precision tp / (tp + fp + eps) falls short of 1 by an ulp.
    for key in ("voc07_map", "voc12_map", "coco_map", "coco_ap50", "coco_ap75"):
        assert result[key] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(result["voc07_ap"], [1.0, 1.0])


# Two GTs, A and B; B is never detected. The hit on A scores 0.9 or 0.8, a false positive the other.
# TP then FP: recall (.5, .5), precision (1, .5).
#   11-point: thresholds 0, .1, ..., .5 (6 of them) reach recall .5 with best precision 1; .6 ... 1 get 0: 6/11.
#   area: envelope 1 on recall (0, .5], nothing beyond .5: .5 * 1 = .5.
# FP then TP: recall (0, .5), precision (0, .5).
#   11-point: the same 6 thresholds see best precision .5: 6 * .5 / 11 = 3/11.  area: .5 * .5 = .25.
@pytest.mark.parametrize("tp_score, fp_score, ap07, ap12", [(0.9, 0.8, 6 / 11, 0.5), (0.8, 0.9, 3 / 11, 0.25)])
def test_one_true_and_one_false_positive(tp_score, fp_score, ap07, ap12):
    gt = [np.array([[1, 1, 10, 10, 0, 0], [50, 50, 60, 60, 0, 0]], dtype=float)]
    det = [np.array([[1, 1, 10, 10, tp_score, 0], [20, 20, 30, 30, fp_score, 0]])]
    result = evaluate_detections(det, gt, 1)
    assert result["voc07_ap"][0] == pytest.approx(ap07, abs=1e-12)
    assert result["voc12_ap"][0] == pytest.approx(ap12, abs=1e-12)


def test_voc07_thresholds_are_numpy_arange_floats():
    # 3 of 10 GTs found with precision 1: recall 3/10 is the double nearest 0.3, while arange's 0.3 is
    # 0.30000000000000004, one step above, so only thresholds 0, .1, .2 are reached: 3/11 (not 4/11).
    gt = [np.column_stack([np.arange(10) * 20 + 1.0, np.ones(10), np.arange(10) * 20 + 10, np.full(10, 10.0),
                           np.zeros((10, 2))])]
    det = [np.column_stack([gt[0][:3, :4], [0.9, 0.8, 0.7], np.zeros(3)])]
    assert evaluate_detections(det, gt, 1)["voc07_map"] == pytest.approx(3 / 11, abs=1e-12)


def test_iou_of_exactly_one_half_counts_with_the_plus_one_convention():
    # GT (1,1,10,10) is 10 x 10 = 100 pixels; det (1,1,10,5) is 10 x 5 = 50, all inside it: IoU 50/100 = 0.5.
    # (Without the +1 the same boxes would give 9*4 / (9*9) = 0.44, a miss.)
    gt = [np.array([[1, 1, 10, 10, 0, 0]], dtype=float)]
    result = evaluate_detections([np.array([[1, 1, 10, 5, 0.9, 0]])], gt, 1)
    assert result["voc07_map"] == result["voc12_map"] == 1.0
    assert result["coco_ap50"] == pytest.approx(1.0, abs=1e-12)
    # det (1,1,10,4): 40/100 = 0.4, a false positive.
    result = evaluate_detections([np.array([[1, 1, 10, 4, 0.9, 0]])], gt, 1)
    assert result["voc07_map"] == result["voc12_map"] == result["coco_ap50"] == 0.0


def test_detection_of_a_difficult_object_is_ignored_and_keeps_its_curve_point():
    gt = [np.array([[1, 1, 10, 10, 0, 0], [30, 30, 40, 40, 0, 1]], dtype=float)]
    # TP on the normal GT (.9), a hit on the difficult one (.8, ignored), a false positive (.7).
    det = [np.array([[1, 1, 10, 10, 0.9, 0], [30, 30, 40, 40, 0.8, 0], [60, 60, 70, 70, 0.7, 0]])]
    (curve,) = voc_precision_recall(det, gt, 1)
    np.testing.assert_array_equal(curve.recall, [1, 1, 1])
    np.testing.assert_array_equal(curve.precision, [1, 1, 0.5])
    # Ranked first, the ignored hit changes nothing: AP stays 1 (as a false positive it would make it .5).
    det[0][1, 4] = 0.95
    result = evaluate_detections(det, gt, 1)
    assert result["voc07_map"] == result["voc12_map"] == 1.0


def test_best_match_on_a_difficult_object_does_not_fall_back_to_another():
    # The det overlaps the difficult GT fully (IoU 1) and the normal one at 90/100 = 0.9: the devkit ignores
    # it, so the normal GT stays missed. COCOeval instead prefers the normal GT (a match to it up to IoU .9).
    gt = [np.array([[1, 1, 10, 10, 0, 0], [1, 1, 10, 9, 0, 1]], dtype=float)]
    result = evaluate_detections([np.array([[1, 1, 10, 9, 0.9, 0]])], gt, 1)
    assert result["voc07_map"] == result["voc12_map"] == 0.0
    assert result["coco_ap50"] == pytest.approx(1.0, abs=1e-12)


def test_difficult_objects_are_crowd_regions_in_coco():
    # GT A is normal, D (101,1,200,100) difficult. Detections: two exact hits on D (.9, .8), a small box inside
    # D (.7) and a hit on A (.5).
    # COCO: D is a crowd region, any number of detections may match it and are ignored; overlap with it is
    # intersection over the detection's own area, so the small box (11 x 11 inside D) has 1 and is ignored
    # too: AP 1. VOC ignores both hits on D, but the small box overlaps D by 121 / 10000 only, a false
    # positive: recall (0, 0, 0, 1), precision (0, 0, 0, .5), AP .5 either way.
    gt = [np.array([[1, 1, 10, 10, 0, 0], [101, 1, 200, 100, 0, 1]], dtype=float)]
    det = [np.array([[101, 1, 200, 100, 0.9, 0], [101, 1, 200, 100, 0.8, 0], [150, 50, 160, 60, 0.7, 0],
                     [1, 1, 10, 10, 0.5, 0]])]
    result = evaluate_detections(det, gt, 1)
    assert result["voc07_map"] == result["voc12_map"] == 0.5
    assert result["coco_map"] == pytest.approx(1.0, abs=1e-12)
    got = [result["coco_map"], result["coco_ap50"], result["coco_ap75"]]
    np.testing.assert_allclose(got, pycocotools_stats(det, gt, 1), rtol=0, atol=1e-9)


def test_duplicate_detections_are_false_positives():
    gt = [np.array([[1, 1, 10, 10, 0, 0], [30, 30, 40, 40, 0, 0]], dtype=float)]
    det = [np.array([[1, 1, 10, 10, 0.9, 0], [1, 1, 10, 10, 0.8, 0], [30, 30, 40, 40, 0.7, 0]])]
    (curve,) = voc_precision_recall(det, gt, 1)
    np.testing.assert_array_equal(curve.recall, [0.5, 0.5, 1])
    np.testing.assert_allclose(curve.precision, [1, 0.5, 2 / 3])
    # area: .5 * 1 + .5 * 2/3.
    assert evaluate_detections(det, gt, 1)["voc12_ap"][0] == pytest.approx(0.5 + 1 / 3)


def test_tied_scores_keep_image_order():
    # Equal scores: image 0's false positive ranks before image 1's hit, so recall (0, 1), precision (0, .5).
    gt = [np.zeros((0, 6)), np.array([[1, 1, 10, 10, 0, 0]], dtype=float)]
    det = [np.array([[1, 1, 10, 10, 0.5, 0]]), np.array([[1, 1, 10, 10, 0.5, 0]])]
    assert evaluate_detections(det, gt, 1)["voc12_map"] == 0.5
    assert evaluate_detections(det[::-1], gt[::-1], 1)["voc12_map"] == 1.0


def test_equal_overlaps_go_to_the_first_ground_truth_in_voc_and_the_last_in_coco():
    # GTs A (1,1,10,10) and B (3,1,12,10); det D1 (2,1,11,10) overlaps each by 9*10 = 90 of a union 110 (.82).
    # D2 is exactly A. VOC gives D1 to A (first on ties), so D2 is a duplicate on A and B stays missed:
    # recall (.5, .5), precision (1, .5), area AP .5. COCOeval gives D1 to B (its '>=' keeps the last), and
    # D2 then takes A.
    gt = [np.array([[1, 1, 10, 10, 0, 0], [3, 1, 12, 10, 0, 0]], dtype=float)]
    det = [np.array([[2, 1, 11, 10, 0.9, 0], [1, 1, 10, 10, 0.8, 0]])]
    result = evaluate_detections(det, gt, 1)
    assert result["voc12_map"] == 0.5
    expected = pycocotools_stats(det, gt, 1)
    got = [result["coco_map"], result["coco_ap50"], result["coco_ap75"]]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert result["coco_ap75"] == pytest.approx(1.0, abs=1e-12)


def test_coco_averages_over_iou_thresholds():
    # GT (1,1,100,1) and det (1,1,78,1): IoU 78/100 = .78, a match at thresholds .50 ... .75 (6 of 10): 0.6.
    result = evaluate_detections([np.array([[1, 1, 78, 1, 0.9, 0]])], [np.array([[1, 1, 100, 1, 0, 0]])], 1)
    assert result["coco_map"] == pytest.approx(0.6, abs=1e-12)
    assert result["coco_ap50"] == pytest.approx(1.0, abs=1e-12)
    assert result["coco_ap75"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("empty", [np.zeros((0, 6)), np.zeros((0,)), []])
def test_no_detections_gives_zero(empty):
    gt = [np.array([[1, 1, 10, 10, 0, 0]], dtype=float), np.array([[5, 5, 20, 20, 1, 0]], dtype=float)]
    result = evaluate_detections([empty, empty], gt, 2)
    for key in ("voc07_map", "voc12_map", "coco_map", "coco_ap50", "coco_ap75"):
        assert result[key] == 0.0
    np.testing.assert_array_equal(result["voc12_ap"], [0.0, 0.0])


def test_class_without_ground_truth_is_nan_and_left_out_of_the_mean():
    # Class 1 has only a false positive and no GT, class 2 only a difficult GT; only class 0 counts.
    gt = [np.array([[1, 1, 10, 10, 0, 0], [30, 30, 40, 40, 2, 1]], dtype=float)]
    det = [np.array([[1, 1, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.8, 1]])]
    result = evaluate_detections(det, gt, 3)
    np.testing.assert_array_equal(result["voc07_ap"], [1.0, np.nan, np.nan])
    assert result["voc07_map"] == result["voc12_map"] == 1.0
    assert result["coco_map"] == pytest.approx(1.0, abs=1e-12)
    assert voc_precision_recall(det, gt, 3)[1] is None


# --- bad input ---------------------------------------------------------------------------------------------


GOOD_GT = np.array([[1, 1, 10, 10, 0, 0]], dtype=float)
GOOD_DET = np.array([[1, 1, 10, 10, 0.9, 0]])


@pytest.mark.parametrize("detections, ground_truths, num_classes, message", [
    ([GOOD_DET], [GOOD_GT, GOOD_GT], 1, "detections has 1 images but ground_truths has 2"),
    ([GOOD_DET[:, :4]], [GOOD_GT], 1,
     "detections[0] has shape (1, 4); expected (N, 6): x1, y1, x2, y2, score, class_id"),
    ([GOOD_DET], [GOOD_GT[0]], 1,
     "ground_truths[0] has shape (6,); expected (N, 6): x1, y1, x2, y2, class_id, difficult"),
    ([GOOD_DET, GOOD_DET + [0, 0, 0, 0, 0, 2]], [GOOD_GT, GOOD_GT], 2, "detections[1] has a class_id outside 0..1"),
    ([GOOD_DET], [GOOD_GT + [0, 0, 0, 0, 0.5, 0]], 3, "ground_truths[0] has a class_id outside 0..2"),
    ([GOOD_DET], [GOOD_GT + [0, 0, 0, 0, 0, 2]], 1, "ground_truths[0] has a difficult flag other than 0 or 1"),
    ([GOOD_DET, GOOD_DET * [1, 1, 1, 1, np.nan, 1]], [GOOD_GT, GOOD_GT], 1, "detections[1] holds a non-finite value"),
    ([GOOD_DET], [GOOD_GT * [1, 1, np.inf, 1, 1, 1]], 1, "ground_truths[0] holds a non-finite value"),
    # x2 - x1 + 1 = -1 (x2 = 8 for x1 = 10): one pixel short of an empty box.
    ([np.array([[10, 1, 8, 10, 0.9, 0]])], [GOOD_GT], 1,
     "detections[0] has a box with x2 - x1 + 1 < 0 or y2 - y1 + 1 < 0"),
    ([GOOD_DET], [np.array([[1, 10, 10, 8, 0, 0]])], 1,
     "ground_truths[0] has a box with x2 - x1 + 1 < 0 or y2 - y1 + 1 < 0"),
    ([GOOD_DET], [GOOD_GT], 0, "num_classes must be a positive integer, got 0"),
    ([GOOD_DET], [GOOD_GT], 1.0, "num_classes must be a positive integer, got 1.0"),
    ([GOOD_DET], [GOOD_GT], True, "num_classes must be a positive integer, got True"),
])
def test_bad_input_raises_a_clear_value_error(detections, ground_truths, num_classes, message):
    with pytest.raises(ValueError) as raised:
        evaluate_detections(detections, ground_truths, num_classes)
    assert str(raised.value) == message


def test_an_empty_box_is_valid_input():
    # x2 = x1 - 1 (or y2 = y1 - 1): zero pixels wide, the smallest box the checks accept. It overlaps nothing.
    gt = [np.array([[10, 1, 9, 10, 0, 0], [1, 10, 10, 9, 0, 0], [1, 1, 10, 10, 0, 0]], dtype=float)]
    det = [np.array([[1, 1, 10, 10, 0.9, 0], [20, 20, 19, 30, 0.8, 0], [20, 20, 30, 19, 0.7, 0]])]
    result = evaluate_detections(det, gt, 1)
    assert result["voc12_map"] == pytest.approx(1 / 3)


def test_no_images_and_no_ground_truth_give_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "mean of empty slice" included
        for detections, ground_truths in (([], []), ([GOOD_DET], [EMPTY])):
            result = evaluate_detections(detections, ground_truths, 2)
            for key in ("voc07_map", "voc12_map", "coco_map", "coco_ap50", "coco_ap75"):
                assert np.isnan(result[key]), key
            assert np.isnan(result["voc12_ap"]).all() and len(result["voc12_ap"]) == 2


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_integer_and_float32_arrays_give_the_float64_result(dtype):
    # Integer boxes and scores, exact in every dtype; 200 x 200 boxes, whose areas (40,000) overflow uint8.
    gt = [np.array([[10, 10, 209, 209, 0, 0], [30, 10, 229, 209, 1, 1], [5, 5, 50, 60, 0, 0]])]
    det = [np.array([[12, 12, 210, 208, 9, 0], [30, 10, 229, 209, 8, 1], [100, 100, 150, 150, 7, 0],
                     [6, 5, 50, 61, 3, 0]])]
    expected = evaluate_detections([det[0].astype(float)], [gt[0].astype(float)], 2)
    got = evaluate_detections([det[0].astype(dtype)], [gt[0].astype(dtype)], 2)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert expected["voc12_map"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # class 0: TP, FP, TP; class 1 NaN


def test_coco_area_range_ends_are_inside():
    # COCOeval's 'all' is [0, 1e10], both ends included: an empty GT (x2 = x1 - 1) counts, as does a GT of
    # exactly 1e10 pixels (100,000 x 100,000) and a tall one of 10,000 x 200,000.
    side, tall = 100_000.0, 200_000.0
    ground_truths = [np.array([[1, 1, side, side, 0, 0], [5, 5, 4, 10, 1, 0], [1, 1, 10_000, tall, 2, 0]])]
    detections = [np.array([[1, 1, side, side, 0.9, 0], [1, 1, 10_000, tall, 0.9, 2]])]
    result = evaluate_detections(detections, ground_truths, 3)
    assert result["coco_map"] == pytest.approx(2 / 3, abs=1e-12)  # the empty GT is counted and missed
    got = [result["coco_map"], result["coco_ap50"], result["coco_ap75"]]
    np.testing.assert_array_equal(got, pycocotools_stats(detections, ground_truths, 3))


def test_coco_ignored_ground_truths_match_only_at_the_thresholds_they_reach():
    # Regular GTs R1 and R2, crowd C. D1 overlaps R1 by 6000 / 10000 = .6 and C by 3300 / 6000 = .55 (a crowd's
    # overlap is over the detection's area): at .5 it takes R1, at .55 and above R1 is out of reach and only C is
    # left; from .6 up nothing, a false positive. D2 is exactly R2, below D1 in score.
    gt = [np.array([[1, 1, 100, 100, 0, 0], [201, 1, 300, 100, 0, 0], [1, 1, 55, 60, 0, 1]], dtype=float)]
    det = [np.array([[1, 1, 100, 60, 0.9, 0], [201, 1, 300, 100, 0.8, 0]])]
    result = evaluate_detections(det, gt, 1)
    got = [result["coco_map"], result["coco_ap50"], result["coco_ap75"]]
    np.testing.assert_array_equal(got, pycocotools_stats(det, gt, 1))
    assert result["coco_ap75"] < 0.5  # D1 a false positive ranked above D2


def test_equal_overlaps_go_to_the_first_ground_truth_for_every_detection():
    # The tie of the test above in two images: each tied detection takes the first GT of the pair.
    gt = np.array([[1, 1, 10, 10, 0, 0], [3, 1, 12, 10, 0, 0]], dtype=float)
    det = np.array([[2, 1, 11, 10, 0.9, 0], [1, 1, 10, 10, 0.8, 0]])
    assert evaluate_detections([det, det], [gt, gt], 1)["voc12_map"] == 0.5


def test_ground_truths_keep_their_input_order_among_hundreds():
    """600 GTs of two classes in one image, all of class 0 on the same box: the first is normal, the others
    difficult. The devkit's first GT at the maximum is the normal one, so the detection of that box is a true
    positive (with the difficult GTs in front, it would be ignored). An unstable sort of 600 elements does
    reorder equal keys."""
    classes = np.random.default_rng(0).integers(0, 2, 600)
    classes[0] = 0
    boxes = np.where(classes[:, None] == 0, [1, 1, 10, 10], [50, 50, 60, 60])
    gt = np.column_stack([boxes, classes, np.r_[0, np.ones(599)] * (classes == 0)]).astype(float)
    result = evaluate_detections([np.array([[1, 1, 10, 10, 0.9, 0]])], [gt], 2)
    assert result["voc12_ap"][0] == 1.0


def test_coco_cuts_each_image_and_class_at_100_detections_like_pycocotools():
    """3 images x 2 classes, 105 detections each in descending score, hits at ranks 0, 50, 99, 100 and 104 of
    each (image, class): those at 100 and 104 are cut, every other rank keeps its place."""
    ground_truths, detections = [], []
    for image in range(3):
        gt, det = [], []
        for cls in range(2):
            hits = [[40 * k + 1, 200 * cls + 1, 40 * k + 30, 200 * cls + 30, cls, 0] for k in range(5)]
            gt += hits
            misses = [[1000 + 3 * k, 1000, 1010 + 3 * k, 1010, 0, cls] for k in range(100)]
            ranked = iter(misses)
            rows = [hits[[0, 50, 99, 100, 104].index(rank)][:4] + [0, cls] if rank in (0, 50, 99, 100, 104)
                    else next(ranked) for rank in range(105)]
            det += [row[:4] + [1 - rank / 1000 - image / 10, cls] for rank, row in enumerate(rows)]
        ground_truths.append(np.array(gt, dtype=float))
        detections.append(np.array(det, dtype=float))
    result = evaluate_detections(detections, ground_truths, 2)
    got = [result["coco_map"], result["coco_ap50"], result["coco_ap75"]]
    np.testing.assert_array_equal(got, pycocotools_stats(detections, ground_truths, 2))
