"""yolo.boxes: the conversions between VOC pixels, normalised boxes and cell boxes, and the IoU of the loss."""
import torch

from yolo.boxes import at_least_one_pixel, cell_to_normalized, normalized_to_voc, paired_iou, voc_to_normalized


def test_voc_pixels_and_normalised_boxes_round_trip():
    voc = torch.tensor([[1.0, 1.0, 500.0, 375.0], [10.0, 20.0, 10.0, 20.0]], dtype=torch.float64)
    normalized = voc_to_normalized(voc, 500, 375)
    torch.testing.assert_close(normalized[0], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(normalized[1], torch.tensor([9 / 500, 19 / 375, 10 / 500, 20 / 375],
                                                           dtype=torch.float64))
    torch.testing.assert_close(normalized_to_voc(normalized, 500, 375), voc)


def test_a_box_under_one_pixel_is_widened_in_any_batch_shape():
    # Batches of boxes (N, K, 4): x2 < x1 by 0.4 and y2 < y1 by 2 in the first, a normal box in the second.
    boxes = torch.tensor([[[10.0, 20.0, 9.6, 18.0]], [[1.0, 2.0, 30.0, 40.0]]])
    widened = at_least_one_pixel(boxes)
    assert widened.shape == (2, 1, 4)
    assert widened.tolist() == [[[10.0, 20.0, 10.0, 20.0]], [[1.0, 2.0, 30.0, 40.0]]]


def test_cells_are_rows_of_y_and_columns_of_x():
    # S = 3, B = 2: a predictor in row 1, column 2 is centred at ((2 + x) / 3, (1 + y) / 3).
    cell_boxes = torch.zeros(1, 3, 3, 2, 4)
    cell_boxes[0, 1, 2, 1] = torch.tensor([0.5, 0.25, 0.2, 0.4])
    boxes = cell_to_normalized(cell_boxes)
    centre_x, centre_y = 2.5 / 3, 1.25 / 3
    torch.testing.assert_close(boxes[0, 1, 2, 1], torch.tensor([centre_x - 0.1, centre_y - 0.2,
                                                                centre_x + 0.1, centre_y + 0.2]))
    # An empty predictor is the point at its cell's top-left corner.
    torch.testing.assert_close(boxes[0, 2, 0, 0], torch.tensor([0.0, 2 / 3, 0.0, 2 / 3]))
    assert cell_to_normalized(cell_boxes.double()).dtype == torch.float64


def test_iou_by_hand_and_never_above_one():
    a = torch.tensor([0.0, 0.0, 0.5, 0.5])
    b = torch.tensor([0.25, 0.0, 0.75, 0.5])
    torch.testing.assert_close(paired_iou(a, b), torch.tensor(0.125 / 0.375))
    assert paired_iou(a, torch.tensor([0.6, 0.6, 0.7, 0.7])) == 0
    # Identical boxes a hundredth of a pixel wide on a 448 px image: their areas are far below the eps.
    tiny = torch.tensor([[0.5, 0.5, 0.5 + 1e-5, 0.5 + 1e-5]], dtype=torch.float64)
    iou = paired_iou(tiny, tiny)
    assert 0 <= iou.item() <= 1


def test_cells_are_decoded_on_the_boxes_device():
    """The meta device stands in for a GPU: a grid of cell offsets made on the CPU could not be added."""
    boxes = cell_to_normalized(torch.zeros(2, 3, 3, 2, 4, device="meta"))
    assert boxes.device.type == "meta" and boxes.shape == (2, 3, 3, 2, 4)
