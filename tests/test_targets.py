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
    boxes = torch.tensor([[0.30, 0.30, 0.40, 0.40], [0.31, 0.31, 0.41, 0.41]])
    target = encode_target(boxes, torch.tensor([2, 4]), 4, 5)
    assert target[1, 1, 5:].argmax() == 2


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
