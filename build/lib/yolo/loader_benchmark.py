"""The loader benchmark: images per second that the training data path delivers, against the path it replaced.

`loader` is train.py's path (uint8 crop, resize and flip in the workers, colour factors drawn there and
applied on the device); `baseline_loader` is the path it replaced, which converted every image to float32
and jittered its colours in the worker, through torchvision's v2 pipeline, with the same random draws.
"""
import math
import time
from functools import partial

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from yolo.boxes import voc_to_normalized
from yolo.device import device_name
from yolo.photometric import MAX_COLOUR_FACTOR, model_input
from yolo.sampling import SeededSamples
from yolo.targets import encode_target
from yolo.timing import elapsed_ms, timing_rows
from yolo.transforms import (FILL, FLIP_PROBABILITY, MIN_BOX_PIXELS, TrainTransform, build_loader, collate_detection,
                             map_boxes, random_windows)

LOADER_MODES = ("loader", "baseline_loader")


class BaselineScaleTranslateResize(v2.Transform):
    """The baseline's geometry: the same windows as TrainTransform's, applied through torchvision's v2
    transform machinery to a channels-first image and its BoundingBoxes."""

    _transformed_types = (tv_tensors.Image, tv_tensors.BoundingBoxes)

    def __init__(self, size):
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs):
        return dict(zip(("x", "y"), random_windows(*v2.query_size(flat_inputs), self.size)))

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            boxes = torch.from_numpy(map_boxes(inpt.as_subclass(torch.Tensor).numpy(), params["x"], params["y"],
                                               self.size))
            return tv_tensors.wrap(boxes, like=inpt, canvas_size=(self.size, self.size))
        (x_src1, x_src2, x_out1, x_out2), (y_src1, y_src2, y_out1, y_out2) = params["x"], params["y"]
        canvas = torch.full((inpt.shape[0], self.size, self.size), FILL, dtype=inpt.dtype)
        canvas[:, y_out1:y_out2, x_out1:x_out2] = v2.functional.resize(
            inpt.as_subclass(torch.Tensor)[:, y_src1:y_src2, x_src1:x_src2], [y_out2 - y_out1, x_out2 - x_out1],
            antialias=True)
        return tv_tensors.Image(canvas)


def _labels_and_difficult(inputs):
    return inputs[1]["labels"], inputs[1]["difficult"]  # module level: it pickles into loader workers


class BaselineTrainTransform(TrainTransform):
    """The training transform as it was before the colour jitter moved to the device: the same random
    draws in the same order, through torchvision's v2 pipeline, with float32 and ColorJitter (uniform
    factors, random order) on each image in the worker."""

    def __init__(self, image_size, grid_size, num_classes):
        super().__init__(image_size, grid_size, num_classes)
        factor_range = (1 / MAX_COLOUR_FACTOR, MAX_COLOUR_FACTOR)
        self.augment = v2.Compose([
            BaselineScaleTranslateResize(image_size), v2.RandomHorizontalFlip(p=FLIP_PROBABILITY),
            v2.ToDtype(torch.float32, scale=True), v2.ColorJitter(brightness=factor_range, saturation=factor_range),
            v2.SanitizeBoundingBoxes(min_size=MIN_BOX_PIXELS, labels_getter=_labels_and_difficult)])

    def __call__(self, image, annotation):
        height, width = image.shape[1:]
        boxes = voc_to_normalized(torch.from_numpy(annotation["boxes"]), width, height)
        image, target = self.augment(tv_tensors.Image(image), {
            "boxes": tv_tensors.BoundingBoxes(boxes * torch.tensor([width, height] * 2), format="XYXY",
                                              canvas_size=(height, width)),
            "labels": torch.from_numpy(annotation["labels"]), "difficult": torch.from_numpy(annotation["difficult"])})
        boxes = target["boxes"].as_subclass(torch.Tensor) / self.image_size
        return image.as_subclass(torch.Tensor), {
            "grid": encode_target(boxes, target["labels"], self.grid_size, self.num_classes), "boxes": boxes,
            "labels": target["labels"], "difficult": target["difficult"], "image_id": annotation["image_id"],
            "orig_size": torch.tensor([height, width])}


def baseline_collate(batch):
    """The baseline's collate: float32 images stacked, and the target dicts passed on as they are (a tensor
    each, so a shared-memory segment each from a worker)."""
    images, targets = zip(*batch)
    return torch.stack(images), torch.stack([target["grid"] for target in targets]), list(targets)


def time_loader(dataset, transform, collate, image_bytes: int, batch_size: int, workers: int, skip: int, count: int,
                device: torch.device) -> np.ndarray:
    """Milliseconds between `count` consecutive batches delivered on `device`, after `skip` batches.

    Delivered: the loader's batch copied to the device. What the training step then does to it there
    (`model_input`: float conversion and, for the new path, the colour jitter) is device work, timed apart.
    """
    dataset.transforms = transform
    batches = skip + count + 1
    # (index, seed) pairs cycling through the images: a fresh augmentation for every sample.
    samples = [(position % len(dataset), position) for position in range(batches * batch_size)]
    loader = build_loader(SeededSamples(dataset), batch_size, shuffle=False, num_workers=workers, sampler=samples,
                          pin_memory=device.type == "cuda", collate_fn=collate, image_bytes=image_bytes,
                          reuse_image_buffers=collate is collate_detection)
    marks = []
    for images, *_ in loader:
        images.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
    del loader  # shuts its workers down before the next measurement starts its own
    return np.diff(marks[skip:]) * 1e3


def benchmark_loader(dataset, config: dict, device: torch.device) -> list[dict]:
    """Rows for the loader modes in `config["modes"]` on `dataset`: every worker count and batch size, the
    modes timed in two rounds of alternating order. A row names no backbone ("none"), the batch's dtype as
    the loader delivers it, and the worker count in its device_name (a measurement of its own)."""
    modes = [mode for mode in config["modes"] if mode in LOADER_MODES]
    transform_args = (config["image_size"], config["grid_size"], len(dataset.class_names))
    pixels = 3 * config["image_size"] ** 2
    pipelines = {"loader": (TrainTransform(*transform_args), collate_detection, pixels),
                 "baseline_loader": (BaselineTrainTransform(*transform_args), baseline_collate,
                                     pixels * torch.float32.itemsize)}
    dtypes = {"loader": "uint8", "baseline_loader": "fp32"}
    rows = []
    for workers in config["num_workers"]:
        common = {"backbone": "none", "device": device.type, "device_name": f"{device_name(device)}, {workers} "
                  f"loader workers", "image_size": config["image_size"], "params_m": 0, "gflops": 0,
                  "torch_version": torch.__version__}
        for batch_size in config["batch_sizes"]:
            # Skip the start: workers starting, and the first batches of all workers arriving at once.
            skip = config["warmup"] + workers
            times = {mode: [] for mode in modes}
            for round_modes in (modes, modes[::-1]):
                for mode in round_modes:
                    times[mode].append(time_loader(dataset, *pipelines[mode], batch_size, workers, skip,
                                                   math.ceil(config["iters"] / 2), device))
            batch_rows = timing_rows({(mode, dtypes[mode], False, "pytorch"): np.concatenate(parts)
                                      for mode, parts in times.items()}, common, batch_size)
            if "loader" in modes:
                dataset.transforms = pipelines["loader"][0]
                batch = collate_detection([SeededSamples(dataset)[(index, index)] for index in range(batch_size)])
                images, factors = batch.images.to(device), batch.colour_factors
                device_ms = np.median([elapsed_ms(partial(model_input, images, device, factors), device)
                                       for _ in range(config["iters"])])
                print(f"batch {batch_size}: float conversion and colour jitter on {device_name(device)}: "
                      f"{device_ms:.2f} ms per batch (device work of the training step, not in the loader rows)")
            throughput = {row["mode"]: row["throughput_img_s"] for row in batch_rows}
            if len(throughput) == 2:
                print(f"loader, {workers} workers, batch {batch_size}: {throughput['loader']:.1f} img/s = "
                      f"{throughput['loader'] / throughput['baseline_loader']:.2f} x the baseline's "
                      f"{throughput['baseline_loader']:.1f}")
            rows += batch_rows
    return rows
