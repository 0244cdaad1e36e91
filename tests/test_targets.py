import torch

from yolo.targets import decode_target, encode_target


def random_boxes_in_distinct_cells(grid_size, count, generator):
    """Boxes inside the image whose centres lie in `count` distinct, randomly chosen cells."""
    cells = torch.randperm(grid_size * grid_size, generator=generator)[:count]
    rows, cols = cells // grid_size, cells % grid_size
    centre = (torch.stack((cols, rows), dim=1) + torch.rand(count, 2, generator=generator)) / grid_size
    half = torch.rand(count, 2, generator=generator) * torch.minimum(centre, 1 - centre)
    boxes = torch.cat((centre - half, centre + half), dim=1)
    return boxes, torch.randint(0, 20, (count,), generator=generator)


def test_round_trip_exact():
    generator = torch.Generator().manual_seed(0)
    for grid_size in (4, 7):
        boxes, labels = random_boxes_in_distinct_cells(grid_size, 10, generator)
        target = encode_target(boxes, labels, grid_size, 20)
        assert target.shape == (grid_size, grid_size, 25) and target.dtype == torch.float32
        decoded_boxes, decoded_labels = decode_target(target)
        # decode_target returns cells row-major; compare after putting the inputs in the same order.
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        order = torch.argsort((centres[:, 1] * grid_size).floor() * grid_size + (centres[:, 0] * grid_size).floor())
        torch.testing.assert_close(decoded_boxes, boxes[order], atol=1e-6, rtol=0)
        assert decoded_labels.tolist() == labels[order].tolist()
        assert target[..., 5:].sum(dim=-1).max() == 1  # one-hot, never multi-hot


def test_larger_box_wins_shared_cell_one_hot():
    small = [0.30, 0.30, 0.40, 0.40]
    large = [0.20, 0.20, 0.50, 0.50]  # same cell (1, 1) at S=4 for both centres
    for boxes, labels in (([small, large], [3, 1]), ([large, small], [1, 3])):
        target = encode_target(torch.tensor(boxes), torch.tensor(labels), 4, 5)
        assert target[..., 4].sum() == 1
        cell = target[1, 1]
        assert cell[4] == 1
        assert cell[5:].tolist() == [0, 1, 0, 0, 0]
        torch.testing.assert_close(cell[2:4], torch.tensor([0.3, 0.3]))


def test_equal_areas_first_listed_wins():
    # Both 0.125 x 0.125 exactly (binary fractions), centres in cell (1, 1) at S=4.
    boxes = torch.tensor([[0.25, 0.25, 0.375, 0.375], [0.3125, 0.25, 0.4375, 0.375]])
    for order, first_label in (([0, 1], 2), ([1, 0], 4)):
        target = encode_target(boxes[order], torch.tensor([2, 4])[order], 4, 5)
        assert target[1, 1, 5:].argmax() == first_label


def test_area_decides_not_height():
    # In cell (1, 1): a tall thin box (0.05 x 0.3, area 0.015) and a wide one (0.3 x 0.1, area 0.03).
    tall, wide = [0.35, 0.2, 0.4, 0.5], [0.2, 0.3, 0.5, 0.4]
    for boxes, labels in (([tall, wide], [0, 1]), ([wide, tall], [1, 0])):
        target = encode_target(torch.tensor(boxes), torch.tensor(labels), 4, 2)
        assert target[1, 1, 5:].tolist() == [0, 1]


def test_each_shared_cell_keeps_its_largest_box():
    # Cell (0, 0) holds one box; cells (2, 2) and (3, 1) each hold a small box listed before a large one.
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2],
                          [0.6, 0.6, 0.65, 0.65], [0.5, 0.5, 0.75, 0.75],
                          [0.3, 0.8, 0.35, 0.85], [0.25, 0.75, 0.5, 1.0]])
    target = encode_target(boxes, torch.tensor([0, 1, 2, 3, 4]), 4, 5)
    assert target[..., 4].sum() == 3
    assert [target[row, col, 5:].argmax().item() for row, col in ((0, 0), (2, 2), (3, 1))] == [0, 2, 4]


def test_one_box():
    target = encode_target(torch.tensor([[0.1, 0.2, 0.3, 0.6]]), torch.tensor([3]), 7, 5)
    assert target[..., 4].sum() == 1 and target[2, 1, 4] == 1 and target[2, 1, 5:].argmax() == 3
    boxes, labels = decode_target(target)
    torch.testing.assert_close(boxes, torch.tensor([[0.1, 0.2, 0.3, 0.6]]), atol=1e-6, rtol=0)
    assert labels.tolist() == [3]


def test_float64_boxes_are_encoded_in_float32():
    """The loaders hand over float32 boxes; a float64 box is rounded first, so the target is the same."""
    generator = torch.Generator().manual_seed(1)
    boxes, labels = random_boxes_in_distinct_cells(7, 30, generator)
    boxes = boxes.double() + torch.rand(30, 4, dtype=torch.float64, generator=generator) * 1e-7
    target = encode_target(boxes, labels, 7, 20)
    assert torch.equal(target, encode_target(boxes.float(), labels, 7, 20))


def test_centre_on_cell_boundary_and_on_far_edge():
    # S=4: a centre at x = 0.5 starts column 2 (offset 0); a centre at 1.0 is clamped into the last cell.
    boxes = torch.tensor([[0.4, 0.1, 0.6, 0.15], [1.0, 1.0, 1.0, 1.0]])
    target = encode_target(boxes, torch.tensor([0, 1]), 4, 2)
    assert target[0, 2, 4] == 1 and target[0, 2, 0] == 0.0
    assert target[3, 3, 4] == 1 and target[3, 3, 0:2].tolist() == [1.0, 1.0]
    decoded, labels = decode_target(target)
    torch.testing.assert_close(decoded, boxes, atol=1e-6, rtol=0)
    assert labels.tolist() == [0, 1]


def test_empty_image_gives_zeros():
    target = encode_target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 7, 20)
    assert target.shape == (7, 7, 25) and not target.any()
    boxes, labels = decode_target(target)
    assert boxes.shape == (0, 4) and labels.shape == (0,)
