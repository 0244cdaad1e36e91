"""Detection data: image decoding, the dataset every layout is served by, and the split protocols.

The annotations come from the readers of `yolo.formats` (VOC, COCO or YOLO layout), all in VOC's box
convention (1-based inclusive pixels); the transforms in `yolo.transforms` convert them to normalised
coordinates.
"""
import io
import os
import re
import sys
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torchvision.io
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.transforms.v2.functional import to_dtype

from yolo.distributed import is_main_process
from yolo.formats import DATA_FORMATS, MAX_LISTED_PROBLEMS, detect_format, has_area_inside, read_splits
from yolo.orientation import header_orientation, upright

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# protocol -> {"train" | "test": [(VOC year folder, split list)]}, as in SPEC section 4.
VOC_PROTOCOLS = {
    "voc2012val": {
        "train": [("VOC2007", "trainval"), ("VOC2007", "test"), ("VOC2012", "train")],
        "test": [("VOC2012", "val")],
    },
    "voc2007test": {
        "train": [("VOC2007", "trainval"), ("VOC2012", "trainval")],
        "test": [("VOC2007", "test")],
    },
    # The test server's (comp4): everything annotated trains; the VOC2012 test images' annotations stay on the
    # server, so the test set is images alone and evaluate.py writes the files the server scores.
    "voc2012test": {
        "train": [("VOC2007", "trainval"), ("VOC2007", "test"), ("VOC2012", "trainval")],
        "test": [("VOC2012", "test")],
        "test_annotated": False,
    },
}
# Your own data_dir in any layout of yolo.formats; `synthetic` is the name make_synthetic.py's sets were first
# trained under, kept so their configs and checkpoints still read.
CUSTOM_PROTOCOLS = ("custom", "synthetic")
PROTOCOLS = (*VOC_PROTOCOLS, *CUSTOM_PROTOCOLS)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageDecodeError(RuntimeError):
    """An image file that cannot be read or decoded; the message names the file."""

    @property
    def reason(self) -> str:
        """The message alone, also when a DataLoader worker raised it (the loader then adds the worker's
        traceback to the message, whose last line is the original)."""
        return str(self).strip().splitlines()[-1].removeprefix(f"{__name__}.ImageDecodeError: ")


def clip_to_image(annotation, width, height):
    """(the annotation with its boxes clipped to [1, width] x [1, height] and those wholly outside dropped, the
    refs of the objects dropped, the refs of those clipped by a pixel or more). A box under a pixel is kept."""
    keep = has_area_inside(annotation["boxes"], width, height)
    written = annotation["boxes"][keep]
    # Only the outer sides are clipped: a box of under a pixel keeps x2 < x1, the width its file gave it.
    boxes = written.copy()
    boxes[:, :2] = boxes[:, :2].clip(min=1)
    boxes[:, 2] = boxes[:, 2].clip(max=width)
    boxes[:, 3] = boxes[:, 3].clip(max=height)
    refs = np.array(annotation["refs"], dtype=object).reshape(-1)
    clipped = refs[keep][(np.abs(boxes - written) >= 1).any(axis=1)].tolist()
    return ({**annotation, "boxes": boxes, "labels": annotation["labels"][keep],
             "difficult": annotation["difficult"][keep], "crowd": annotation["crowd"][keep],
             "refs": refs[keep].tolist(), "width": width, "height": height}, refs[~keep].tolist(), clipped)


def report_box_changes(dropped, clipped):
    """One warning block per kind of change, each object named as its file writes it ('file: object'), from the
    main process alone (every process of a torchrun job reads the same files)."""
    for what, refs in (("dropped {} object(s) lying wholly outside their image", dropped),
                       ("clipped {} box(es) reaching a pixel or more outside their image to its edges", clipped)):
        if refs and is_main_process():
            lines = [f"warning: {what.format(len(refs))}:", *(f"  {ref}" for ref in refs[:MAX_LISTED_PROBLEMS])]
            if len(refs) > MAX_LISTED_PROBLEMS:
                lines.append(f"  and {len(refs) - MAX_LISTED_PROBLEMS} more")
            print("\n".join(lines), file=sys.stderr, flush=True)


def usable_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_image(path):
    """Image file -> uint8 (3, H, W) RGB tensor, as displayed (EXIF orientation applied, see
    `yolo.orientation`); ImageDecodeError names the file.

    The format is read from the content, not the extension (a PNG named .jpg is still a PNG). JPEG, PNG,
    GIF and WebP go through torchvision's decoder (the fast path, and JPEG is what training reads); anything
    it refuses (BMP, TIFF, a JPEG it finds damaged) gets a second try through PIL. Alpha is dropped,
    grayscale, palette and CMYK are converted to RGB, 16-bit samples scaled to 8 bits, and an animated
    GIF gives its first frame.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageDecodeError(f"{path}: cannot read the file ({error.strerror}); check the path and its "
                               "permissions") from None
    return decode_image_bytes(data, path)


def decode_image_bytes(data: bytes, name, advice: str = "re-extract or replace the file"):
    """An image file's bytes -> uint8 (3, H, W) RGB tensor, as `decode_image` reads a file. ImageDecodeError
    names the image `name` and ends with `advice`."""
    if not data:
        raise ImageDecodeError(f"{name}: cannot decode image (the file is empty); {advice}")
    if data.startswith(PNG_SIGNATURE):
        # torchvision's PNG decoder ends the process (a segmentation fault) on a PNG whose image data stops
        # short, where libpng says "Not enough image data"; Pillow raises an error instead.
        return _decode_with_pil(data, name, advice)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoder in favour of TorchCodec, which the pinned environment
            # lacks; the decoder is still there and about twice as fast as going through PIL.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")
            image = torchvision.io.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                mode=ImageReadMode.RGB)
    except RuntimeError as error:
        torchvision_reason = _torchvision_reason(error)
    else:
        image = image[0] if image.ndim == 4 else image
        image = image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)
        return upright(image, _orientation(data))
    return _decode_with_pil(data, name, advice, torchvision_reason)


def _orientation(data):
    try:
        with _metadata_warnings_ignored(), Image.open(io.BytesIO(data)) as header:
            return header_orientation(header)
    except (OSError, ValueError, SyntaxError):  # torchvision decoded what Pillow cannot open: no tag read
        return 1


@contextmanager
def _metadata_warnings_ignored():
    """Pillow's warnings about damaged metadata ("Corrupt EXIF data") left unsaid: such an image is read as if it
    had none, and every decode of it would repeat them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _torchvision_reason(error):
    # Its messages start with the C++ function and source location, which help nobody here.
    return re.sub(r"^\w+, \S+:\d+, ", "", str(error).strip().splitlines()[0])


def _decode_with_pil(data, name, advice, torchvision_reason=None):
    try:
        with _metadata_warnings_ignored(), Image.open(io.BytesIO(data)) as image:
            orientation = header_orientation(image)  # from the header already read, not a second opening
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: its high byte, as torchvision takes
                grey = torch.from_numpy((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
                pixels = grey.expand(3, *grey.shape)
            else:
                pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        return upright(pixels, orientation).contiguous()
    except Image.UnidentifiedImageError:
        reason = "not an image in a format this reads: JPEG, PNG, GIF, WebP, BMP, TIFF and others"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = str(error) if torchvision_reason is None or torchvision_reason.startswith(
            "Unsupported image file") else torchvision_reason
    raise ImageDecodeError(f"{name}: cannot decode image ({reason}); {advice}")


class DetectionDataset(torch.utils.data.Dataset):
    """The images and annotations of one or more splits, as the readers of `yolo.formats` give them
    (`samples`, in any of the layouts), served as (uint8 image, annotation dict) or through `transforms`.

    All annotations are read at construction, so a bad or missing file fails now, named, rather than hours
    into training. Boxes are clipped to the image, and those wholly outside it dropped: one warning lists
    them, each with its file and as the file writes it, and another the boxes clipped by a pixel or more.
    Difficult objects are kept (as the seed did): evaluation needs them to ignore matches, and
    `TrainTransform(use_difficult=False)` drops them from training targets. Crowd regions (COCO's iscrowd) are
    difficult for the metrics and never training targets.

    An image whose decoded size disagrees with its annotation's: the decoded pixels are trusted (they are
    what the model sees), the boxes are clipped to them and a warning names the file. `annotations`
    keeps the annotation's view, since checking every image's size at construction would decode them all.

    `cache_images()` decodes every image once into RAM; loader workers forked afterwards share those
    pages with the training process (copy-on-write) instead of decoding each image again every epoch.

    An image that cannot be decoded raises ImageDecodeError, or with `skip_unreadable` gives None and a
    warning line naming it (`collate_detection` leaves it out of its batch): training loses one image, not an
    epoch.
    """

    def __init__(self, class_names, samples, class_ids=None, transforms=None, skip_unreadable=False,
                 data_format="voc"):
        self.class_names = tuple(class_names)
        # The dataset's own ids, for files read outside the project (COCO results): its class ids in class order,
        # its image ids (COCO's own; elsewhere the image id).
        self.class_ids = list(class_ids) if class_ids is not None else list(range(1, len(class_names) + 1))
        self.transforms = transforms
        self.skip_unreadable = skip_unreadable
        self.data_format = data_format
        self.image_ids = [sample.image_id for sample in samples]
        self.file_ids = [sample.image_id if sample.file_id is None else sample.file_id for sample in samples]
        self.annotations, dropped, clipped = [], [], []
        for sample in samples:
            annotation, lost, moved = clip_to_image(sample.annotation, sample.annotation["width"],
                                                    sample.annotation["height"])
            self.annotations.append(annotation)
            dropped += [f"{sample.source}: {ref}" for ref in lost]
            clipped += [f"{sample.source}: {ref}" for ref in moved]
        report_box_changes(dropped, clipped)
        self._image_paths = [sample.image_path for sample in samples]
        self._decoded = None
        repeated = sorted(image_id for image_id, count in Counter(self.image_ids).items() if count > 1)
        if repeated:
            raise ValueError(f"{len(repeated)} image id(s) listed more than once ({', '.join(repeated[:5])}"
                             f"{' ...' if len(repeated) > 5 else ''}); each image may be listed only once")

    def __len__(self):
        return len(self.image_ids)

    def summary(self, split: str) -> str:
        """One line: the split's images and objects, per class."""
        labels = np.concatenate([np.zeros(0, dtype=np.int64), *(item["labels"] for item in self.annotations)])
        counts = np.bincount(labels, minlength=len(self.class_names))
        return (f"{split}: {len(self)} images, {len(labels)} objects: "
                + ", ".join(f"{name} {count}" for name, count in zip(self.class_names, counts)))

    def classes_line(self) -> str:
        """The layout and the classes in the model's order, each with its id in the dataset's files."""
        return (f"data: {self.data_format} layout, {len(self.class_names)} classes (their ids in the files): "
                + ", ".join(f"{name} ({class_id})" for name, class_id in zip(self.class_names, self.class_ids)))

    def image_path(self, index):
        return self._image_paths[index]

    def cached_bytes(self):
        """RAM that cache_images() will take, from the annotations' image sizes (uint8 RGB)."""
        return sum(3 * annotation["width"] * annotation["height"] for annotation in self.annotations)

    def cache_images(self):
        """Decode every image into RAM now (in threads: the decoder releases the GIL). With `skip_unreadable`,
        an image that fails is remembered as its error and skipped when asked for, as without the cache."""
        with ThreadPoolExecutor(usable_cores()) as pool:
            self._decoded = list(pool.map(self._decode_for_cache, self._image_paths))

    def _decode_for_cache(self, path):
        try:
            return decode_image(path)
        except ImageDecodeError as error:
            if not self.skip_unreadable:
                raise
            return error

    def __getitem__(self, index):
        path = self._image_paths[index]
        try:
            if self._decoded is None:
                image = decode_image(path)
            elif isinstance(self._decoded[index], ImageDecodeError):
                raise self._decoded[index]
            else:  # a copy, so that callers may edit it without corrupting the cache
                image = self._decoded[index].clone()
        except ImageDecodeError as error:
            if not self.skip_unreadable:
                raise
            print(f"warning: skipped {error}", file=sys.stderr, flush=True)
            return None
        # A copy, arrays included, so callers may edit it without corrupting the dataset.
        annotation = {key: value.copy() if isinstance(value, np.ndarray) else value
                      for key, value in self.annotations[index].items()}
        annotation["image_id"] = self.image_ids[index]
        height, width = image.shape[1:]
        if (width, height) != (annotation["width"], annotation["height"]):
            warnings.warn(f"{path}: decoded size {width} x {height} differs from the annotation's "
                          f"{annotation['width']} x {annotation['height']}; using the decoded size")
            annotation, _, _ = clip_to_image(annotation, width, height)
        if self.transforms is not None:
            return self.transforms(image, annotation)
        return image, annotation


def has_test_annotations(protocol):
    """Whether a protocol's test set comes with its annotations (all but voc2012test's, which the server keeps)."""
    return VOC_PROTOCOLS.get(protocol, {}).get("test_annotated", True)


def build_dataset(protocol, data_dir, train, transforms=None, class_names=None, data_format="auto", split=None):
    """The train or test set of a protocol (PROTOCOLS).

    The VOC protocols read data_dir/VOCdevkit/VOC2007 and VOC2012 (VOC_PROTOCOLS) with the 20 VOC classes.
    `custom` (or `synthetic`) reads data_dir itself in `data_format` (auto: the layout it holds; see
    yolo.formats), split `split` (default: train or val). `class_names` (a checkpoint's, or the training set's
    for its validation set) maps the labels by name; default: the dataset's own class list.
    """
    if protocol in VOC_PROTOCOLS:
        if data_format not in ("auto", "voc"):
            raise ValueError(f"data_format={data_format} is for protocol=custom (your own data); the VOC "
                             f"protocols read data_dir/VOCdevkit")
        sources = [(Path(data_dir) / "VOCdevkit" / folder, voc_split)
                   for folder, voc_split in VOC_PROTOCOLS[protocol]["train" if train else "test"]]
        layout = "voc" if train or has_test_annotations(protocol) else "voc_images"
        return DetectionDataset(*read_splits(layout, sources, class_names or VOC_CLASSES), transforms=transforms,
                                data_format="voc")
    if protocol not in CUSTOM_PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known protocols: {', '.join(PROTOCOLS)}")
    if data_format not in ("auto", *DATA_FORMATS):
        raise ValueError(f"unknown data_format {data_format!r}; known: auto, {', '.join(DATA_FORMATS)}")
    data_format = detect_format(data_dir) if data_format == "auto" else data_format
    split = split or ("train" if train else "val")
    return DetectionDataset(*read_splits(data_format, [(data_dir, split)], class_names), transforms=transforms,
                            data_format=data_format)
