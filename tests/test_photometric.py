"""yolo.photometric: the batch's way to the device, held on the CPU with the meta device standing in for a GPU."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from yolo.photometric import jitter_colours_, model_input


class DeviceCopies(TorchDispatchMode):
    """Records the device and non_blocking flag of every copy to another device."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:
            self.copies.append((kwargs["device"].type, kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


def test_the_batch_and_its_factors_go_to_the_device_without_waiting():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with DeviceCopies() as recorder:
        output = model_input(images, torch.device("meta"), torch.ones(2, 2))
    assert output.device.type == "meta" and output.dtype == torch.float32
    assert output.is_contiguous(memory_format=torch.channels_last)
    assert recorder.copies == [("meta", True), ("meta", True)]  # the images, then the colour factors


def test_a_float_batch_is_jittered_on_a_copy():
    images = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    before = images.clone()
    factors = torch.tensor([[1.4, 0.7], [0.8, 1.3]])
    output = model_input(images, torch.device("cpu"), factors)
    assert torch.equal(images, before)
    assert torch.equal(output, jitter_colours_(before.clone(), factors))
