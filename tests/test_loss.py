"""The YOLOv1 loss against hand-worked cases and an independent loop-based implementation."""
import math

import pytest
import torch

from yolo.loss import yolo_loss, yolo_loss_terms

S, B, C = 2, 2, 2  # small grid for the hand-worked cases: 2 x 2 cells, 2 predictors, 2 classes


def cell(boxes, classes):
    """One cell's prediction from B (x, y, w, h, conf) tuples and C class probabilities."""
    return [value for box in boxes for value in box] + list(classes)


def empty_cell(conf1=0.1, conf2=0.2):
    return cell([(0.7, 0.7, 0.7, 0.7, conf1), (0.3, 0.3, 0.3, 0.3, conf2)], (0.7, 0.7))


def grid(cells):
    """A (1, S, S, ...) tensor from a row-major list of cells."""
    return torch.tensor(cells, dtype=torch.float64).view(1, S, S, -1)


def target_with_one_object():
    """Cell (0, 0) holds a box centred in it with w = h = 0.5, of class 1: image box [0, 0.5] x [0, 0.5]."""
    empty = [0.0] * (5 + C)
    return grid([[0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 1.0], empty, empty, empty])


def test_one_object_cell_and_empty_cells_by_hand():
    # Predictor 0 is shifted by 0.1 cell = 0.05 image in x: box [0.05, 0.55] x [0, 0.5].
    # Intersection with [0, 0.5]^2 is 0.45 * 0.5 = 0.225, union 0.25 + 0.25 - 0.225 = 0.275: IoU 9/11.
    # Predictor 1 is [0.125, 0.375]^2 inside the target: IoU 0.0625 / 0.25 = 0.25, so predictor 0 is responsible.
    object_cell = cell([(0.6, 0.5, 0.5, 0.5, 0.6), (0.5, 0.5, 0.25, 0.25, 0.4)], (0.3, 0.8))
    pred = grid([object_cell, empty_cell(), empty_cell(), empty_cell()])
    terms = yolo_loss_terms(pred, target_with_one_object())

    assert terms["coord"].item() == pytest.approx(5 * 0.1 ** 2)
    assert terms["obj"].item() == pytest.approx((0.6 - 9 / 11) ** 2)
    # The other predictor of the object cell (0.4) and both predictors of the three empty cells.
    assert terms["noobj"].item() == pytest.approx(0.5 * (0.4 ** 2 + 3 * (0.1 ** 2 + 0.2 ** 2)))
    assert terms["cls"].item() == pytest.approx(0.3 ** 2 + 0.2 ** 2)
    total = 0.05 + (0.6 - 9 / 11) ** 2 + 0.5 * (0.16 + 0.15) + 0.13
    assert yolo_loss(pred, target_with_one_object()).item() == pytest.approx(total)


def test_sqrt_of_width_and_height():
    # Predictor 0 has w = 0.25, h = 0.5625 against w = h = 0.5: both boxes share a centre,
    # IoU = (0.25 * 0.5) / (0.25 + 0.140625 - 0.125) = 0.125 / 0.265625.
    object_cell = cell([(0.5, 0.5, 0.25, 0.5625, 1.0), (0.9, 0.9, 0.01, 0.01, 0.0)], (0.0, 1.0))
    pred = grid([object_cell, empty_cell(0, 0), empty_cell(0, 0), empty_cell(0, 0)])
    terms = yolo_loss_terms(pred, target_with_one_object())
    sqrt_half = math.sqrt(0.5)
    assert terms["coord"].item() == pytest.approx(5 * ((0.5 - sqrt_half) ** 2 + (0.75 - sqrt_half) ** 2))
    assert terms["obj"].item() == pytest.approx((1 - 0.125 / 0.265625) ** 2)
    assert terms["noobj"].item() == pytest.approx(0.0)
    assert terms["cls"].item() == pytest.approx(0.0)


def test_tied_iou_makes_the_first_predictor_responsible():
    # Both predictors are exact (IoU 1): the first is responsible, the second pays the no-object term.
    object_cell = cell([(0.5, 0.5, 0.5, 0.5, 0.7), (0.5, 0.5, 0.5, 0.5, 0.9)], (0.0, 1.0))
    pred = grid([object_cell, empty_cell(0, 0), empty_cell(0, 0), empty_cell(0, 0)])
    terms = yolo_loss_terms(pred, target_with_one_object())
    assert terms["obj"].item() == pytest.approx((0.7 - 1.0) ** 2)
    assert terms["noobj"].item() == pytest.approx(0.5 * 0.9 ** 2)


def test_two_objects_and_mean_over_images():
    # Image 0: exact boxes in cells (0, 0) and (1, 1), confidences 1, one class wrong by 0.5 in each.
    # Image 1: empty, every confidence 0.5, so 8 predictors x 0.5 x 0.25 = 1.0.
    exact = [(0.5, 0.5, 0.5, 0.5, 1.0), (0.5, 0.5, 0.5, 0.5, 0.0)]
    pred_image0 = [cell(exact, (0.5, 1.0)), empty_cell(0, 0), empty_cell(0, 0), cell(exact, (1.0, 0.5))]
    pred_image1 = [empty_cell(0.5, 0.5)] * 4
    pred = torch.cat([grid(pred_image0), grid(pred_image1)])
    empty = [0.0] * (5 + C)
    target = torch.cat([
        grid([[0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 1.0], empty, empty, [0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 0.0]]),
        grid([empty] * 4),
    ])
    terms = yolo_loss_terms(pred, target)
    assert terms["coord"].item() == pytest.approx(0.0)
    assert terms["obj"].item() == pytest.approx(0.0)
    assert terms["cls"].item() == pytest.approx((0.25 + 0.25) / 2)
    assert terms["noobj"].item() == pytest.approx((0.0 + 1.0) / 2)


def reference_loss(pred, target, lambda_coord=5.0, lambda_noobj=0.5):
    """A plain loop over images, cells and predictors, written from the paper's equation."""
    num_images, grid_size = pred.shape[0], pred.shape[1]
    num_classes = target.shape[-1] - 5
    num_boxes = (pred.shape[-1] - num_classes) // 5

    def corners(x, y, w, h, row, col):
        cx, cy = (x + col) / grid_size, (y + row) / grid_size
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-9)

    total = 0.0
    for n in range(num_images):
        for row in range(grid_size):
            for col in range(grid_size):
                p, t = pred[n, row, col].tolist(), target[n, row, col].tolist()
                boxes = [p[5 * b:5 * b + 5] for b in range(num_boxes)]
                if t[4] == 0:
                    total += lambda_noobj * sum(box[4] ** 2 for box in boxes)
                    continue
                truth = corners(*t[:4], row, col)
                ious = [iou(corners(*box[:4], row, col), truth) for box in boxes]
                best = ious.index(max(ious))
                for b, box in enumerate(boxes):
                    if b != best:
                        total += lambda_noobj * box[4] ** 2
                x, y, w, h, conf = boxes[best]
                total += lambda_coord * ((x - t[0]) ** 2 + (y - t[1]) ** 2
                                         + (math.sqrt(w) - math.sqrt(t[2])) ** 2
                                         + (math.sqrt(h) - math.sqrt(t[3])) ** 2)
                total += (conf - ious[best]) ** 2
                total += sum((p[5 * num_boxes + c] - t[5 + c]) ** 2 for c in range(num_classes))
    return total / num_images


def random_target(generator, num_images, grid_size, num_classes):
    target = torch.zeros(num_images, grid_size, grid_size, 5 + num_classes, dtype=torch.float64)
    has_object = torch.rand(num_images, grid_size, grid_size, generator=generator) < 0.3
    target[..., :4] = torch.rand(num_images, grid_size, grid_size, 4, generator=generator, dtype=torch.float64)
    target[..., 4] = has_object.double()
    classes = torch.randint(num_classes, (num_images, grid_size, grid_size), generator=generator)
    target[..., 5:] = torch.nn.functional.one_hot(classes, num_classes).double()
    return target * has_object.unsqueeze(-1)


@pytest.mark.parametrize("seed", range(5))
def test_matches_loop_reference_on_random_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    grid_size, num_boxes, num_classes = 4, 1 + seed % 3, 3
    pred = torch.rand(3, grid_size, grid_size, 5 * num_boxes + num_classes, generator=generator,
                      dtype=torch.float64)
    target = random_target(generator, 3, grid_size, num_classes)
    assert yolo_loss(pred, target).item() == pytest.approx(reference_loss(pred, target), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("lambda_coord, lambda_noobj", [(2.0, 0.5), (5.0, 3.0), (0.0, 0.0)])
def test_the_term_weights_are_the_ones_given(lambda_coord, lambda_noobj):
    generator = torch.Generator().manual_seed(7)
    pred = torch.rand(3, 4, 4, 2 * 5 + 3, generator=generator, dtype=torch.float64)
    target = random_target(generator, 3, 4, 3)
    weights = {"lambda_coord": lambda_coord, "lambda_noobj": lambda_noobj}
    assert yolo_loss(pred, target, **weights).item() == pytest.approx(reference_loss(pred, target, **weights),
                                                                     rel=1e-9, abs=1e-12)
    unweighted = yolo_loss_terms(pred, target, lambda_coord=1.0, lambda_noobj=1.0)
    weighted = yolo_loss_terms(pred, target, **weights)
    assert weighted["noobj"].item() == pytest.approx(lambda_noobj * unweighted["noobj"].item(), rel=1e-12)
    assert weighted["coord"].item() == pytest.approx(lambda_coord * unweighted["coord"].item(), rel=1e-12)


def test_gradients_are_finite_even_for_zero_width():
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 4, 4, 5 * 2 + 3, generator=generator)
    pred[..., 2:4] = 0.0  # w and h of predictor 0 exactly zero
    pred[..., 7:9] = 0.0
    target = random_target(generator, 2, 4, 3).float()
    target[0, 0, 0, :5] = torch.tensor([0.5, 0.5, 0.2, 0.3, 1.0])
    pred.requires_grad_(True)
    loss = yolo_loss(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_confidence_target_carries_no_gradient_into_the_boxes():
    """The IoU target of the confidence term is a constant: only the coordinate term moves the boxes."""
    generator = torch.Generator().manual_seed(1)
    target = random_target(generator, 1, 4, 3)
    pred = torch.rand(1, 4, 4, 13, generator=generator, dtype=torch.float64, requires_grad=True)
    yolo_loss_terms(pred, target)["obj"].backward()
    box_channels = [0, 1, 2, 3, 5, 6, 7, 8]
    assert pred.grad[..., box_channels].abs().max() == 0


def test_mismatched_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match="same grid"):
        yolo_loss(torch.rand(1, 7, 7, 30), torch.rand(1, 4, 4, 25))


@pytest.mark.parametrize("pred_dtype, target_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                                      (torch.float32, torch.float64)])
def test_loss_is_computed_in_float32_for_low_precision_and_float32_predictions(pred_dtype, target_dtype):
    """Under autocast the head gives bf16 or fp16; the loss and its terms are float32, the target's dtype aside."""
    generator = torch.Generator().manual_seed(3)
    pred = torch.rand(2, 4, 4, 13, generator=generator, dtype=torch.float64)
    target = random_target(generator, 2, 4, 3)
    terms = yolo_loss_terms(pred.to(pred_dtype), target.to(target_dtype))
    expected = yolo_loss_terms(pred.to(pred_dtype).float(), target.to(target_dtype).float())
    for name, value in terms.items():
        assert value.dtype == torch.float32, name
        assert torch.equal(value, expected[name]), name

