import numpy as np
import pytest
import torch
from torchvision.ops import nms

from yolo.postprocess import decode_predictions, detection_rows, to_voc_arrays, widen_sub_pixel_boxes
from yolo.targets import encode_target

S, B, C = 4, 2, 3


def prediction_from_target(target: torch.Tensor) -> torch.Tensor:
    """A perfect network output for `target`: predictor 0 copies the box with confidence 1."""
    pred = torch.zeros(*target.shape[:-1], 5 * B + C)
    pred[..., :4] = target[..., :4]
    pred[..., 4] = target[..., 4]
    pred[..., 5 * B:] = target[..., 5:]
    return pred


def test_encoding_then_decoding_gives_back_the_boxes():
    boxes = torch.tensor([[0.05, 0.10, 0.20, 0.30], [0.55, 0.50, 0.95, 0.90], [0.30, 0.60, 0.45, 0.99]])
    labels = torch.tensor([2, 0, 1])
    pred = prediction_from_target(encode_target(boxes, labels, S, C)).unsqueeze(0)
    (detections,) = decode_predictions(pred, C)
    order = torch.argsort(detections["boxes"][:, 0])
    torch.testing.assert_close(detections["boxes"][order], boxes[torch.argsort(boxes[:, 0])])
    assert detections["labels"][order].tolist() == labels[torch.argsort(boxes[:, 0])].tolist()
    assert torch.all(detections["scores"] == 1.0)


def test_scores_are_class_specific_and_a_cell_can_report_several_classes():
    pred = torch.zeros(1, S, S, 5 * B + C)
    pred[0, 1, 1, :5] = torch.tensor([0.5, 0.5, 0.2, 0.2, 0.8])
    pred[0, 1, 1, 5 * B:] = torch.tensor([0.5, 0.25, 0.0])
    (detections,) = decode_predictions(pred, C)
    assert detections["labels"].tolist() == [0, 1]
    torch.testing.assert_close(detections["scores"], torch.tensor([0.4, 0.2]))


def test_nms_is_per_class_and_ranked_by_class_score():
    pred = torch.zeros(1, S, S, 5 * B + C)
    # Two predictors of one cell on nearly the same box: the higher objectness has the lower class score.
    pred[0, 0, 0, :10] = torch.tensor([0.5, 0.5, 0.2, 0.2, 0.9, 0.5, 0.5, 0.21, 0.21, 0.6])
    pred[0, 0, 0, 10:] = torch.tensor([0.3, 0.0, 0.0])
    pred[0, 0, 1, :5] = torch.tensor([0.5, 0.5, 0.2, 0.2, 1.0])  # a neighbour, another class
    pred[0, 0, 1, 10:] = torch.tensor([0.0, 0.0, 0.9])
    (detections,) = decode_predictions(pred, C)
    # Class 0: both predictors share the class probability 0.3, so the higher confidence (0.9) survives.
    assert detections["labels"].tolist() == [2, 0]
    torch.testing.assert_close(detections["scores"], torch.tensor([0.9, 0.27]))


def test_boxes_are_clipped_and_detections_capped_per_image():
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 7, 7, 5 * B + 20, generator=generator)
    detections = decode_predictions(pred, 20, max_detections=25)
    for detection in detections:
        assert len(detection["boxes"]) == 25
        assert detection["boxes"].min() >= 0 and detection["boxes"].max() <= 1
        assert torch.all(detection["scores"][:-1] >= detection["scores"][1:])


def reference_decode(pred, num_classes, score_threshold, nms_iou, max_detections):
    """One image at a time, one cell at a time, one class at a time."""
    results = []
    for image in pred:
        candidates = []
        for row in range(image.shape[0]):
            for col in range(image.shape[1]):
                cell = image[row, col]
                for b in range(B):
                    x, y, w, h, conf = cell[5 * b:5 * b + 5].tolist()
                    cx, cy = (x + col) / image.shape[1], (y + row) / image.shape[0]
                    box = [min(max(v, 0.0), 1.0) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)]
                    for c in range(num_classes):
                        score = conf * cell[5 * B + c].item()
                        if score > score_threshold:
                            candidates.append((box, score, c))
        kept = []
        for c in range(num_classes):
            of_class = [(box, score) for box, score, label in candidates if label == c]
            if of_class:
                boxes = torch.tensor([box for box, _ in of_class])
                scores = torch.tensor([score for _, score in of_class])
                kept += [(scores[i].item(), c, boxes[i].tolist()) for i in nms(boxes, scores, nms_iou)]
        kept.sort(key=lambda item: -item[0])
        results.append(kept[:max_detections])
    return results


@pytest.mark.parametrize("seed", range(3))
def test_matches_a_loop_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.rand(3, S, S, 5 * B + C, generator=generator)
    pred[..., [2, 3, 7, 8]] *= 0.5
    detections = decode_predictions(pred, C, score_threshold=0.1, max_detections=20)
    for detection, expected in zip(detections, reference_decode(pred, C, 0.1, 0.5, 20)):
        assert len(detection["scores"]) == len(expected)
        expected_scores = torch.tensor([score for score, _, _ in expected])
        torch.testing.assert_close(detection["scores"], expected_scores)
        assert sorted(detection["labels"].tolist()) == sorted(label for _, label, _ in expected)


def test_voc_arrays_use_one_based_inclusive_pixels_of_each_images_size():
    first = {"boxes": torch.tensor([[0.0, 0.0, 1.0, 0.5]]), "scores": torch.tensor([0.7]), "labels": torch.tensor([4])}
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    third = {"boxes": torch.tensor([[0.5, 0.25, 0.75, 1.0], [0.0, 0.5, 0.25, 0.75]]),
             "scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([1, 0])}
    arrays = to_voc_arrays([first, empty, third], [(375, 500), (10, 10), (200, 100)])
    assert [array.dtype for array in arrays] == [np.float64] * 3 and arrays[1].shape == (0, 6)
    np.testing.assert_allclose(arrays[0], [[1, 1, 500, 187.5, 0.7, 4]], rtol=1e-6)
    np.testing.assert_allclose(arrays[2], [[51, 51, 75, 200, 0.9, 1], [1, 101, 25, 150, 0.3, 0]], rtol=1e-6)
    assert to_voc_arrays([], []) == []


def test_an_empty_image_gives_no_detection():
    (detections,) = decode_predictions(torch.zeros(1, S, S, 5 * B + C), C)
    assert detections["boxes"].shape == (0, 4)
    assert to_voc_arrays([detections], [(10, 10)])[0].shape == (0, 6)


def test_a_score_must_be_above_the_threshold():
    pred = torch.zeros(1, 1, 1, 5 + 2)
    pred[0, 0, 0] = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25])  # scores 0.25 and 0.125, exact in float32
    (detections,) = decode_predictions(pred, 2, score_threshold=0.125)
    assert detections["scores"].tolist() == [0.25] and detections["labels"].tolist() == [0]


def test_images_of_a_batch_never_suppress_each_other():
    """The same box in two images, or in two classes of two images, is detected in each: NMS is per image and
    class, also with more classes than candidates (a 1 x 1 grid of one predictor)."""
    generator = torch.Generator().manual_seed(5)
    pred = torch.rand(1, S, S, 5 * B + 20, generator=generator)
    pred[..., [2, 3, 7, 8]] = 0.8 + 0.2 * pred[..., [2, 3, 7, 8]]  # large boxes: any shift of one overlaps it
    single = decode_predictions(pred, 20, score_threshold=0.1)[0]
    for detection in decode_predictions(pred.expand(2, -1, -1, -1), 20, score_threshold=0.1):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(detection[key], single[key]), key
    tiny = torch.tensor([[[[0.5, 0.5, 0.4, 0.4, 1.0, 0.0, 0.9, 0.0]]], [[[0.5, 0.5, 0.4, 0.4, 1.0, 0.9, 0.0, 0.0]]]])
    first, second = decode_predictions(tiny, 3)
    assert first["labels"].tolist() == [1] and second["labels"].tolist() == [0]


def test_a_box_under_a_pixel_is_widened_to_one_and_the_array_given_is_left_alone():
    detections = np.array([[10.0, 20.0, 9.6, 19.8, 0.9, 1], [5.0, 6.0, 30.0, 40.0, 0.5, 0]])
    given = detections.copy()
    np.testing.assert_array_equal(widen_sub_pixel_boxes(detections),
                                  [[10.0, 20.0, 10.0, 20.0, 0.9, 1], [5.0, 6.0, 30.0, 40.0, 0.5, 0]])
    np.testing.assert_array_equal(detections, given)


def test_detection_rows_name_each_box_with_its_source_frame_and_class():
    detections = np.array([[10.5, 20.25, 30.0, 40.0, 0.875, 1], [1.0, 2.0, 3.0, 4.0, 0.5, 0]], dtype=np.float32)
    rows = detection_rows("a/b.jpg", 7, detections, ["cat", "dog"])
    assert rows == [{"source": "a/b.jpg", "frame": 7, "x1": 10.5, "y1": 20.25, "x2": 30.0, "y2": 40.0,
                     "score": 0.875, "class_id": 1, "class_name": "dog"},
                    {"source": "a/b.jpg", "frame": 7, "x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "score": 0.5,
                     "class_id": 0, "class_name": "cat"}]
    assert all(type(row[key]) is float for row in rows for key in ("x1", "y1", "x2", "y2", "score"))
    assert all(type(row["class_id"]) is int for row in rows)
    assert detection_rows("a/b.jpg", 0, np.zeros((0, 6)), ["cat"]) == []
