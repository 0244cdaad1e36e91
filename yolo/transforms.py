"""Image + box transforms for training and evaluation, the batch collate function and the DataLoader.

Both transforms take (uint8 (3, H, W) image, annotation dict from `yolo.data`) and return
(float32 (3, image_size, image_size) image in [0, 1], target dict) where the target dict holds
`grid` (the YOLO target, see `yolo.targets`), `boxes` (normalised x1, y1, x2, y2 after the transform),
`labels`, `difficult`, `image_id` and `orig_size` ([H, W] of the decoded image).
"""
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from yolo.boxes import voc_to_normalized
from yolo.targets import encode_target

# The paper: random scaling and translation of up to 20 % of the image size, exposure and saturation
# up to a factor of 1.5. Brightness multiplies RGB, which scales HSV's V; the range is symmetric in log.
MAX_SHIFT = 0.2
SCALE_RANGE = (0.8, 1.2)
COLOUR_FACTOR_RANGE = (1 / 1.5, 1.5)
# Neutral grey where a shift uncovers the canvas: black would add strong artificial edges.
FILL = 127


def _axis_window(length, size, scale, shift):
    """Integer (source start, source end, output start, output end) along one axis.

    Scaling the image by `scale` about its centre and shifting it by `shift` (a fraction of its size)
    shows source coordinate `start` at output 0 and `span` source pixels across the output.
    """
    start = length * (0.5 - (0.5 + shift) / scale)
    span = length / scale
    source_start = round(max(start, 0.0))
    source_end = max(round(min(start + span, length)), source_start + 1)
    output_start = min(max(round((source_start - start) * size / span), 0), size - 1)
    output_end = min(max(round((source_end - start) * size / span), output_start + 1), size)
    return source_start, source_end, output_start, output_end


class RandomScaleTranslateResize(v2.Transform):
    """The paper's random scaling and translation, fused with the resize to the square network input.

    Scaling about the centre and shifting only decide which window of the original fills the output,
    so a crop and one resize do it: a single resampling straight from the original, several times
    cheaper on a CPU than a resize followed by an affine warp (v2.RandomAffine takes ~28 ms at 448).
    Boxes are mapped with the same integer window as the pixels, then clipped to the canvas.
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.BoundingBoxes)

    def __init__(self, size, scale_range=SCALE_RANGE, max_shift=MAX_SHIFT, fill=FILL):
        super().__init__()
        self.size, self.scale_range, self.max_shift, self.fill = size, scale_range, max_shift, fill

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        scale = torch.empty(1).uniform_(*self.scale_range).item()
        shift_x, shift_y = torch.empty(2).uniform_(-self.max_shift, self.max_shift).tolist()
        return {"x": _axis_window(width, self.size, scale, shift_x), "y": _axis_window(height, self.size, scale, shift_y)}

    def transform(self, inpt, params):
        x_src1, x_src2, x_out1, x_out2 = params["x"]
        y_src1, y_src2, y_out1, y_out2 = params["y"]
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            gain = torch.tensor([(x_out2 - x_out1) / (x_src2 - x_src1), (y_out2 - y_out1) / (y_src2 - y_src1)] * 2)
            source = torch.tensor([x_src1, y_src1] * 2, dtype=torch.float32)
            output = torch.tensor([x_out1, y_out1] * 2, dtype=torch.float32)
            boxes = ((inpt.as_subclass(torch.Tensor) - source) * gain + output).clamp(0, self.size)
            return tv_tensors.wrap(boxes, like=inpt, canvas_size=(self.size, self.size))
        crop = inpt.as_subclass(torch.Tensor)[:, y_src1:y_src2, x_src1:x_src2]
        canvas = torch.full((inpt.shape[0], self.size, self.size), self.fill, dtype=inpt.dtype)
        canvas[:, y_out1:y_out2, x_out1:x_out2] = v2.functional.resize(
            crop, [y_out2 - y_out1, x_out2 - x_out1], antialias=True)
        return tv_tensors.Image(canvas)


def _labels_and_difficult(inputs):
    # Module-level rather than a lambda so the transform pickles into spawned DataLoader workers.
    return inputs[1]["labels"], inputs[1]["difficult"]


def _normalized_boxes(image, annotation, keep):
    height, width = image.shape[1:]
    return voc_to_normalized(torch.from_numpy(annotation["boxes"][keep]), width, height)


def _target(boxes, labels, difficult, annotation, orig_size, grid_size, num_classes):
    return {
        "grid": encode_target(boxes, labels, grid_size, num_classes),
        "boxes": boxes,
        "labels": labels,
        "difficult": difficult,
        "image_id": annotation["image_id"],
        "orig_size": torch.tensor(list(orig_size), dtype=torch.int64),
    }


class TrainTransform:
    """Random scale/translate fused with the resize, horizontal flip, exposure/saturation jitter.

    Boxes follow the image, are clipped to it, and are dropped when left under a pixel wide or tall.
    Difficult objects stay in the targets unless use_difficult=False.
    """

    def __init__(self, image_size, grid_size, num_classes, use_difficult=True):
        self.image_size, self.grid_size, self.num_classes = image_size, grid_size, num_classes
        self.use_difficult = use_difficult
        self.augment = v2.Compose([
            RandomScaleTranslateResize(image_size),
            v2.RandomHorizontalFlip(p=0.5),
            # Colour ops on float: cheaper than on uint8 and no intermediate rounding.
            v2.ToDtype(torch.float32, scale=True),
            v2.ColorJitter(brightness=COLOUR_FACTOR_RANGE, saturation=COLOUR_FACTOR_RANGE),
            v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_labels_and_difficult),
        ])

    def __call__(self, image, annotation):
        keep = slice(None) if self.use_difficult else ~annotation["difficult"]
        height, width = image.shape[1:]
        boxes = _normalized_boxes(image, annotation, keep) * torch.tensor([width, height, width, height])
        image, target = self.augment(tv_tensors.Image(image), {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.from_numpy(annotation["labels"][keep]),
            "difficult": torch.from_numpy(annotation["difficult"][keep]),
        })
        boxes = target["boxes"].as_subclass(torch.Tensor) / self.image_size
        return image.as_subclass(torch.Tensor), _target(boxes, target["labels"], target["difficult"], annotation,
                                                        (height, width), self.grid_size, self.num_classes)


class EvalTransform:
    """Resize only (aspect ratio not kept, as in training); every object, difficult included, is kept."""

    def __init__(self, image_size, grid_size, num_classes):
        self.image_size, self.grid_size, self.num_classes = image_size, grid_size, num_classes

    def __call__(self, image, annotation):
        resized = v2.functional.resize(image, [self.image_size, self.image_size], antialias=True)
        return v2.functional.to_dtype(resized, torch.float32, scale=True), _target(
            _normalized_boxes(image, annotation, slice(None)), torch.from_numpy(annotation["labels"]),
            torch.from_numpy(annotation["difficult"]), annotation, image.shape[1:], self.grid_size,
            self.num_classes)


def collate_detection(batch):
    """[(image, target dict)] -> (images (N, 3, H, W), grids (N, S, S, 5 + C), [target dicts])."""
    images, targets = zip(*batch)
    return torch.stack(images), torch.stack([t["grid"] for t in targets]), list(targets)


def build_loader(dataset, batch_size, shuffle, num_workers, sampler=None, drop_last=False, seed=0):
    """DataLoader for detection batches.

    Reproducible augmentation: the seeded generator fixes the shuffling order and every worker's torch
    seed, from which the transforms draw (they use no numpy or `random` state). With num_workers=0 they
    draw from the main process's torch RNG, so seed that with torch.manual_seed. The same seed with a
    different number of workers gives different (but equally reproducible) augmentations; for
    augmentation independent of workers, wrap the dataset in yolo.sampling.SeededSamples.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_detection,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
