"""Image + box transforms for training and evaluation, the batch collate function, the DataLoader and the
copy of its batches to the device.

Both transforms take (uint8 (3, H, W) image, annotation dict from `yolo.data`) and return
(uint8 (3, image_size, image_size) image, target dict) where the target dict holds `grid` (the YOLO
target, see `yolo.targets`), `boxes` (normalised x1, y1, x2, y2 after the transform), `labels`,
`difficult`, `image_id` and `orig_size` ([H, W] of the decoded image); the training transform adds
`colour_factors`, the sample's exposure and saturation factors that `yolo.photometric.model_input`
applies on the device. Images stay uint8 until then: a quarter of float32's bytes to collate, pass
between processes, pin and copy.
"""
import math
import os
import shutil
import signal
import sys
import threading
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, SequentialSampler, get_worker_info
from torchvision.transforms import v2

from yolo.boxes import voc_to_normalized
from yolo.data import usable_cores
from yolo.photometric import draw_colour_factors
from yolo.sampling import FirstPassEmpty
from yolo.targets import encode_target

# The paper: random scaling and translation of up to 20 % of the image size (exposure and saturation:
# yolo.photometric).
MAX_SHIFT = 0.2
SCALE_RANGE = (0.8, 1.2)
# Neutral grey where a shift uncovers the canvas: black would add strong artificial edges.
FILL = 127
FLIP_PROBABILITY = 0.5  # horizontal flip (common practice; darknet does it)
MIN_BOX_PIXELS = 1  # boxes left narrower or shorter than this after the transform are dropped


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


def random_windows(height, width, size, scale_range=SCALE_RANGE, max_shift=MAX_SHIFT):
    """The paper's random scaling (about the centre) and translation as integer windows per axis (see
    _axis_window): (x window, y window), drawn from torch's RNG."""
    scale = torch.empty(1).uniform_(*scale_range).item()
    shift_x, shift_y = torch.empty(2).uniform_(-max_shift, max_shift).tolist()
    return _axis_window(width, size, scale, shift_x), _axis_window(height, size, scale, shift_y)


def crop_and_resize(image, x_window, y_window, size, flip=False, fill=FILL):
    """uint8 (3, H, W) -> uint8 (3, size, size) showing the windows' source region in their output region,
    flipped horizontally if `flip`.

    Scaling about the centre and shifting only decide which window of the original fills the output,
    so a crop and one resize do it: a single resampling straight from the original, several times
    cheaper on a CPU than a resize followed by an affine warp (v2.RandomAffine takes ~28 ms at 448).
    The result is channels-last (strides of (size, size, 3) pixels), where the uint8 antialiased
    resize runs about twice as fast, and the layout the model and the batch use. The flip mirrors the
    resized region into the mirrored output window: the same pixels as flipping the result, without a
    copy of the whole canvas.
    """
    x_src1, x_src2, x_out1, x_out2 = x_window
    y_src1, y_src2, y_out1, y_out2 = y_window
    # Channels-last with the batch stride of a real (1, H, W, C) array: a crop of the whole decoded image,
    # unsqueezed, has a batch stride of C, which the resize takes for channels-first (its slow path).
    crop = image[:, y_src1:y_src2, x_src1:x_src2].permute(1, 2, 0).contiguous()[None].permute(0, 3, 1, 2)
    resized = F.interpolate(crop, size=(y_out2 - y_out1, x_out2 - x_out1), mode="bilinear", antialias=True)
    if flip:
        resized, x_out1, x_out2 = resized.flip(-1), size - x_out2, size - x_out1
    # The fill around the region in one pass (half the time of filling a canvas and copying the region into it).
    return F.pad(resized, (x_out1, size - x_out2, y_out1, size - y_out2), value=fill)[0]


def map_boxes(boxes, x_window, y_window, size):
    """Pixel x1, y1, x2, y2 boxes, a float32 (M, 4) array, through crop_and_resize's windows, clipped to the
    size x size canvas."""
    x_src1, x_src2, x_out1, x_out2 = x_window
    y_src1, y_src2, y_out1, y_out2 = y_window
    gain = np.array([(x_out2 - x_out1) / (x_src2 - x_src1), (y_out2 - y_out1) / (y_src2 - y_src1)] * 2,
                    dtype=np.float32)
    source = np.array([x_src1, y_src1] * 2, dtype=np.float32)
    output = np.array([x_out1, y_out1] * 2, dtype=np.float32)
    return ((boxes - source) * gain + output).clip(0, size)


def _normalized_boxes(annotation, keep, width, height):
    return voc_to_normalized(torch.from_numpy(annotation["boxes"][keep]), width, height)


def _target(boxes, labels, difficult, annotation, orig_size, grid_size, num_classes, objects=slice(None)):
    """`objects`: those of the boxes that go into the grid (all but crowd regions)."""
    return {
        "grid": encode_target(boxes[objects], labels[objects], grid_size, num_classes),
        "boxes": boxes,
        "labels": labels,
        "difficult": difficult,
        "image_id": annotation["image_id"],
        "orig_size": torch.tensor(list(orig_size), dtype=torch.int64),
    }


class TrainTransform:
    """Random scale/translate fused with the resize, then a horizontal flip, on uint8 pixels; draws the
    colour factors that yolo.photometric applies on the device.

    Boxes follow the image, are clipped to it, and are dropped when left under a pixel wide or tall.
    Difficult objects stay in the targets unless use_difficult=False; crowd regions never do (they are not
    objects, only regions the metrics ignore). Every random draw comes from
    torch's RNG, in a fixed order: the windows, the flip, the colour factors.
    """

    def __init__(self, image_size, grid_size, num_classes, use_difficult=True):
        self.image_size, self.grid_size, self.num_classes = image_size, grid_size, num_classes
        self.use_difficult = use_difficult

    def __call__(self, image, annotation):
        keep = ~annotation["crowd"] if self.use_difficult else ~(annotation["crowd"] | annotation["difficult"])
        height, width = image.shape[1:]
        size = self.image_size
        x_window, y_window = random_windows(height, width, size)
        flip = torch.rand(1).item() < FLIP_PROBABILITY
        image = crop_and_resize(image, x_window, y_window, size, flip)
        # The few boxes in NumPy: a fraction of torch's cost per operation, the same float32 arithmetic.
        boxes = _normalized_boxes(annotation, keep, width, height).numpy() * np.float32([width, height] * 2)
        boxes = map_boxes(boxes, x_window, y_window, size)
        if flip:
            boxes = boxes[:, [2, 1, 0, 3]]
            boxes[:, 0::2] = size - boxes[:, 0::2]
        visible = (boxes[:, 2:] - boxes[:, :2] >= MIN_BOX_PIXELS).all(axis=1)
        labels = torch.from_numpy(annotation["labels"][keep][visible])
        difficult = torch.from_numpy(annotation["difficult"][keep][visible])
        return image, {**_target(torch.from_numpy(boxes[visible] / size), labels, difficult, annotation,
                                 (height, width), self.grid_size, self.num_classes),
                       "colour_factors": draw_colour_factors()}


class EvalTransform:
    """Resize only (aspect ratio not kept, as in training); every object, difficult included, is kept for the
    metrics, and crowd regions left out of the grid (the validation loss's target), as in training."""

    def __init__(self, image_size, grid_size, num_classes):
        self.image_size, self.grid_size, self.num_classes = image_size, grid_size, num_classes

    def __call__(self, image, annotation):
        return v2.functional.resize(image, [self.image_size, self.image_size], antialias=True), _target(
            _normalized_boxes(annotation, slice(None), image.shape[2], image.shape[1]),
            torch.from_numpy(annotation["labels"]),
            torch.from_numpy(annotation["difficult"]), annotation, image.shape[1:], self.grid_size,
            self.num_classes, objects=torch.from_numpy(~annotation["crowd"]))


class DetectionBatch(NamedTuple):
    """A detection micro-batch as collate_detection makes it.

    images: uint8 (N, 3, H, W), channels-last. grids: the YOLO targets (N, S, S, 5 + C). colour_factors:
    float32 (N, 2) exposure and saturation factors, or None where the transform draws none (evaluation,
    augment=false). targets: the per-image target dicts, without the grid and the factors.
    The factors are one tensor rather than NumPy arrays in the dicts, so that the DataLoader pins them with
    the images and the grids, and their copy to the GPU need not wait for the host.
    """
    images: torch.Tensor
    grids: torch.Tensor
    colour_factors: torch.Tensor | None
    targets: list[dict]


def collate_detection(batch, image_buffers=0):
    """[(image, target dict)] -> DetectionBatch; None when no sample is left.

    The target dicts hold the per-image values as NumPy arrays: from a loader worker every tensor travels
    in a shared-memory segment of its own, which for a handful of small tensors per image costs more than
    decoding the image, while arrays are copied inline. Samples that are None (images skipped as
    unreadable) are left out. image_buffers > 0: in a loader worker, the images go into that many
    shared-memory buffers in turn (see build_loader's reuse_image_buffers) instead of a fresh one each batch.
    """
    batch = [sample for sample in batch if sample is not None]
    if not batch:
        return None
    images, targets = zip(*batch)
    batch_images = _image_buffer(len(images), images[0], image_buffers)
    # An image at a time: torch.stack into a channels-last `out` took 11.6 ms for 16 images at 448 in a
    # worker, these copies 0.7 ms.
    for slot, image in zip(batch_images, images):
        slot.copy_(image)
    factors = (torch.stack([target["colour_factors"] for target in targets]) if "colour_factors" in targets[0]
               else None)
    target_dicts = [{key: value.numpy() if isinstance(value, torch.Tensor) else value
                     for key, value in target.items() if key not in ("grid", "colour_factors")} for target in targets]
    return DetectionBatch(batch_images, torch.stack([target["grid"] for target in targets]), factors, target_dicts)


def _image_buffer(count, image, reused):
    """An empty (count, *image.shape) channels-last tensor; in a loader worker, in shared memory (as
    default_collate allocates its batches there): the worker would otherwise copy the batch into shared memory
    to pass it on. With `reused` > 0, the worker's next of that many buffers, taken in turn."""
    channels, height, width = image.shape
    if get_worker_info() is None:
        return torch.empty((count, channels, height, width), dtype=image.dtype, memory_format=torch.channels_last)
    nbytes = count * image.numel() * image.element_size()
    if reused:
        # Keyed by process: a worker forked from a process that holds buffers must not write into them.
        ring = _worker_buffers.setdefault(os.getpid(), {"storages": [None] * reused, "turn": 0})
        slot = ring["turn"] % reused
        ring["turn"] += 1
        if ring["storages"][slot] is None or ring["storages"][slot].nbytes() < nbytes:
            ring["storages"][slot] = torch.UntypedStorage._new_shared(nbytes)
        storage = ring["storages"][slot]
    else:
        storage = torch.UntypedStorage._new_shared(nbytes)
    return (torch.empty(0, dtype=image.dtype).set_(storage, 0, (count * height * width * channels,), (1,))
            .view(count, height, width, channels).permute(0, 3, 1, 2))


_worker_buffers = {}  # process id -> that loader worker's reused image buffers and the next one's turn


# num_workers="auto" gives each training process its share of the CPU cores less one (that process's own
# core), within these bounds: more workers than this only add memory and start-up time.
MAX_AUTO_WORKERS = 16


def check_num_workers(setting: str) -> None:
    """Rule for a num_workers setting: `auto` or a whole number of at least 0."""
    if setting != "auto" and not setting.isdigit():
        raise ValueError("must be auto or a whole number of at least 0")


def num_loader_workers(setting: str) -> int:
    """The worker processes per training process for a num_workers setting (`auto` or a number).

    `auto`: the cores this process may use, shared among the training processes of this machine
    (torchrun's LOCAL_WORLD_SIZE), minus the training process itself, at most MAX_AUTO_WORKERS.
    """
    check_num_workers(setting)
    if setting != "auto":
        return int(setting)
    return max(0, min(usable_cores() // processes_on_this_node() - 1, MAX_AUTO_WORKERS))


def processes_on_this_node() -> int:
    """The training processes on this machine, which share its cores and its /dev/shm (torchrun's
    LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


# /dev/shm holds the batches that loader workers pass to the training process (PyTorch's file_descriptor
# sharing): those the workers prepare ahead, and those the training process still holds, the batch in use and
# the one before it (referenced until the next one arrives, or being pinned).
SHARED_MEMORY = Path("/dev/shm")
BATCHES_HELD = 2
DATALOADER_PREFETCH_FACTOR = 2  # PyTorch's default


class SharedMemoryError(ValueError):
    """Too little free space in /dev/shm for the batches a loader's workers pass on."""


def reused_buffer_bytes(num_workers: int, prefetch_factor: int, batch_bytes: int) -> int:
    """The /dev/shm a loader with reused image buffers keeps while its (persistent) workers live."""
    return num_workers * (prefetch_factor + BATCHES_HELD) * batch_bytes


def check_shared_memory(num_workers: int, prefetch_factor: int, batch_bytes: int, reused: bool = False,
                        kept_by_others: int = 0) -> None:
    """SharedMemoryError when /dev/shm (where the platform has it) has less free space than the loader's workers
    will hold there, besides the `kept_by_others` bytes that another loader's workers keep (train.py's training
    loader, during validation): a worker that runs out dies of a bus error that names nothing. `reused`: each
    worker holds prefetch_factor + BATCHES_HELD buffers of its own (build_loader's reuse_image_buffers).

    /dev/shm belongs to the machine: every process of a torchrun job on it (LOCAL_WORLD_SIZE) builds the same
    loaders, so the need is theirs together. Each process checks it before its first collective (DDP's set-up),
    so before any worker on the node starts, and they all see the same free space and agree."""
    if num_workers == 0 or not SHARED_MEMORY.is_dir():
        return
    usage = shutil.disk_usage(SHARED_MEMORY)
    if reused:
        needed = reused_buffer_bytes(num_workers, prefetch_factor, batch_bytes)
        count = f"num_workers {num_workers} x (prefetch_factor {prefetch_factor} + {BATCHES_HELD}) batches"
    else:
        needed = (num_workers * prefetch_factor + BATCHES_HELD) * batch_bytes
        count = f"num_workers {num_workers} x prefetch_factor {prefetch_factor} + {BATCHES_HELD} batches"
    mb = 2 ** 20
    if kept_by_others:
        count += f", besides {kept_by_others / mb:.0f} MB that the training loader's workers keep"
    per_process = needed + kept_by_others
    processes = processes_on_this_node()
    needed = processes * per_process
    if needed <= usage.free:
        return
    shared = "" if processes == 1 else (f"; the {processes} processes on this machine (LOCAL_WORLD_SIZE) need "
                                        f"{per_process / mb:.0f} MB each")
    raise SharedMemoryError(
        f"{SHARED_MEMORY} has {usage.free / mb:.0f} MB free, and the loader needs about {needed / mb:.0f} MB there "
        f"({count} of {batch_bytes / mb:.1f} MB{shared}). In a container, give it more (docker run "
        f"--shm-size={math.ceil((usage.used + needed) / 2 ** 30)}g ...), or lower num_workers, prefetch_factor or "
        f"the (micro-)batch size.")


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A loader worker ends on a SIGTERM from its parent alone (as PyTorch's own handler does, which the process's
    exit and the loader's shutdown send) and ignores one from anyone else. torchrun and SLURM send their stop to
    every process of a job, loader workers included: PyTorch's handler would end those, and the training process
    would fail on its dead workers instead of saving. A thread takes the signal, to learn who sent it (Linux;
    elsewhere, without sigwaitinfo, PyTorch's handler stays)."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_a_sigterm_from, args=(os.getppid(),), name="sigterm", daemon=True).start()


def _exit_on_a_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)


def build_loader(dataset, batch_size, shuffle, num_workers, sampler=None, drop_last=False, seed=0,
                 pin_memory=None, prefetch_factor=None, collate_fn=collate_detection, *, image_bytes,
                 reuse_image_buffers=False, shared_memory_kept_by_others=0, start_workers=False):
    """DataLoader for detection batches.

    Reproducible augmentation: the seeded generator fixes the shuffling order and every worker's torch
    seed, from which the transforms draw (they use no numpy or `random` state). With num_workers=0 they
    draw from the main process's torch RNG, so seed that with torch.manual_seed. The same seed with a
    different number of workers gives different (but equally reproducible) augmentations; for
    augmentation independent of workers, wrap the dataset in yolo.sampling.SeededSamples.

    pin_memory (default: when CUDA is available) puts batches in page-locked memory, so the copy to the
    GPU runs asynchronously; prefetch_factor is how many batches each worker prepares ahead (PyTorch's
    default when None; ignored without workers). image_bytes, the size of one image as the loader delivers
    it, sizes the workers' batches for check_shared_memory, which runs before any worker starts.

    reuse_image_buffers (collate_detection only): each worker collates its images into prefetch_factor +
    BATCHES_HELD shared-memory buffers in turn rather than a fresh one per batch, whose first writes cost a
    page fault every 4 KB: a fifth of a worker's time at 448 pixels. A worker starts a batch only when the
    consumer has taken the one prefetch_factor batches before it from that worker, so a batch's images stay
    as delivered while the consumer holds no more than BATCHES_HELD batches: right for a loop that uses each
    batch once (training), wrong for one that keeps batches (copy them, or leave this off).
    shared_memory_kept_by_others: bytes of /dev/shm that another loader's workers keep meanwhile
    (reused_buffer_bytes), which check_shared_memory counts in.

    start_workers (shuffle=False): fork the workers now, and queue them no work until the first iteration. A
    fork copies only the thread that makes it: a lock that another thread (a queue's feeder, a pin-memory thread,
    a checkpoint writer) holds then stays held in the child for ever. A run that builds all its loaders this way
    before it starts any thread never forks beside one; only the last of them may pin memory, whose thread starts
    with its workers.
    """
    prefetch_factor = prefetch_factor or DATALOADER_PREFETCH_FACTOR
    check_shared_memory(num_workers, prefetch_factor, batch_size * image_bytes, reuse_image_buffers,
                        shared_memory_kept_by_others)
    if reuse_image_buffers:
        if collate_fn is not collate_detection:
            raise ValueError("reuse_image_buffers is for collate_detection's batches")
        collate_fn = partial(collate_detection, image_buffers=prefetch_factor + BATCHES_HELD)
    start_workers = start_workers and num_workers > 0
    if start_workers:
        if shuffle:
            raise ValueError("start_workers takes shuffle=False (give a sampler that shuffles)")
        sampler = FirstPassEmpty(SequentialSampler(dataset) if sampler is None else sampler)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        # Python 3.14 makes forkserver the default, which pickles the dataset and its image cache to each worker.
        multiprocessing_context="fork" if num_workers > 0 and sys.platform == "linux" else None,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=leave_stop_signals_to_the_main_process,
    )
    if start_workers:
        iter(loader)  # persistent workers: the loader keeps this iterator, and its next iteration resets it
    return loader


_END = object()


class DevicePrefetcher:
    """Iterates a loader's batches with their tensors on `device`.

    On CUDA it copies batch k + 1 to the GPU on a side stream while batch k computes: on the compute stream
    the copy would wait for the step before it and hold up the one after. Elsewhere the batches pass through
    unchanged. A batch of tensors is a tuple or list of them (and other items, passed on as they are); a None
    batch (every image skipped) stays None.
    """

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.device.type != "cuda":
            yield from self.loader
            return
        copy_stream = torch.cuda.Stream(self.device)
        compute_stream = torch.cuda.current_stream(self.device)
        copies = (self._copy(batch, copy_stream) for batch in self.loader)
        batch = next(copies, _END)
        while batch is not _END:
            compute_stream.wait_stream(copy_stream)  # for this batch's copy alone: the next one is queued below
            for item in () if batch is None else batch:
                if isinstance(item, torch.Tensor):
                    item.record_stream(compute_stream)  # no reuse of its memory before the compute stream is done
            following = next(copies, _END)
            yield batch
            batch = following

    def _copy(self, batch, stream):
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            moved = [item.to(self.device, non_blocking=True) if isinstance(item, torch.Tensor) else item
                     for item in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
