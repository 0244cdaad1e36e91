"""PASCAL VOC (and VOC-layout) detection data: annotation parsing, the dataset, and the split protocols.

Boxes stay in VOC's own convention here (1-based inclusive pixels, as written in the XML); the
transforms in `yolo.transforms` convert them to normalised coordinates.
"""
import io
import os
import re
import sys
import warnings
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision.io
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.transforms.v2.functional import to_dtype

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# protocol -> {"train" | "test": [(VOC year folder, split list)]}, as in SPEC section 4.
PROTOCOLS = {
    "voc2012val": {
        "train": [("VOC2007", "trainval"), ("VOC2007", "test"), ("VOC2012", "train")],
        "test": [("VOC2012", "val")],
    },
    "voc2007test": {
        "train": [("VOC2007", "trainval"), ("VOC2012", "trainval")],
        "test": [("VOC2007", "test")],
    },
    "synthetic": {"train": [(".", "train")], "test": [(".", "val")]},
}

MISSING_DATA_HINT = ("run `make download` for VOC (or `python data/make_synthetic.py --out DIR` for a synthetic "
                     "set, `make demo` for the whole demo), or check data_dir")

# What a folder scan picks up as images; decode_image reads them by content, whatever the extension says.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names the file and what to do."""


class ImageDecodeError(RuntimeError):
    """An image file that cannot be read or decoded; the message names the file."""

    @property
    def reason(self) -> str:
        """The message alone, also when a DataLoader worker raised it (the loader then adds the worker's
        traceback to the message, whose last line is the original)."""
        return str(self).strip().splitlines()[-1].removeprefix(f"{__name__}.ImageDecodeError: ")


def _number(element, path, xml_path):
    text = element.findtext(path)
    if text is None:
        raise AnnotationError(f"{xml_path}: missing <{path}>; fix or remove this annotation")
    try:
        return float(text)
    except ValueError:
        raise AnnotationError(f"{xml_path}: <{path}> is {text!r}, not a number") from None


def read_voc_annotation(xml_path, class_names):
    """Parse one VOC XML file.

    Returns {"boxes": float32 (M, 4) x1, y1, x2, y2 in VOC 1-based inclusive pixels, "labels": int64 (M,),
    "difficult": bool (M,), "width": int, "height": int}. Only direct `<object>/<bndbox>` elements are
    objects (`<part>` boxes inside a person are not). Boxes are clipped to [1, width] x [1, height]; a box
    left with no area is dropped with a warning. Raises AnnotationError for malformed XML, a missing field
    or a class not in `class_names`.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as error:
        raise AnnotationError(f"{xml_path}: cannot parse annotation XML ({error}); re-extract or fix it") from None
    width = int(_number(root, "size/width", xml_path))
    height = int(_number(root, "size/height", xml_path))
    if width <= 0 or height <= 0:
        raise AnnotationError(f"{xml_path}: image size {width} x {height} is not positive")

    class_index = {name: index for index, name in enumerate(class_names)}
    boxes, labels, difficult = [], [], []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index:
            raise AnnotationError(
                f"{xml_path}: class {name!r} is not one of the dataset's classes {list(class_names)}; "
                "fix the annotation or pass the right class_names (classes.txt for a custom set)"
            )
        boxes.append([_number(obj, f"bndbox/{tag}", xml_path) for tag in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(class_index[name])
        # Some VOC2012 objects have no <difficult> tag; the devkit reads that as not difficult.
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")

    annotation = {
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
        "difficult": np.asarray(difficult, dtype=bool),
        "width": width,
        "height": height,
    }
    return clip_to_image(annotation, width, height, xml_path)


def clip_to_image(annotation, width, height, source):
    """Clip boxes to [1, width] x [1, height]; drop (with a warning naming `source`) those left without area."""
    boxes = annotation["boxes"].copy()
    # Only the outer sides are clipped, so a box wholly outside ends with x2 < x1 (or y2 < y1) and is
    # dropped, rather than shrunk to a sliver on the border. x1 == x2 is one pixel wide, still valid.
    boxes[:, :2] = boxes[:, :2].clip(min=1)
    boxes[:, 2] = boxes[:, 2].clip(max=width)
    boxes[:, 3] = boxes[:, 3].clip(max=height)
    keep = (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
    if not keep.all():
        warnings.warn(f"{source}: dropped {int((~keep).sum())} box(es) with no area inside the "
                      f"{width} x {height} image: {annotation['boxes'][~keep].tolist()}", stacklevel=2)
    return {**annotation, "boxes": boxes[keep], "labels": annotation["labels"][keep],
            "difficult": annotation["difficult"][keep], "width": width, "height": height}


def usable_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_image(path):
    """Image file -> uint8 (3, H, W) RGB tensor; ImageDecodeError names the file.

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
    if not data:
        raise ImageDecodeError(f"{path}: cannot decode image (the file is empty); re-extract or replace the file")
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
        return image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)
    return _decode_with_pil(data, path, torchvision_reason)


def _torchvision_reason(error):
    # Its messages start with the C++ function and source location, which help nobody here.
    return re.sub(r"^\w+, \S+:\d+, ", "", str(error).strip().splitlines()[0])


def _decode_with_pil(data, path, torchvision_reason):
    try:
        with Image.open(io.BytesIO(data)) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    except Image.UnidentifiedImageError:
        reason = "not an image in a format this reads: JPEG, PNG, GIF, WebP, BMP, TIFF and others"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        unsupported_by_torchvision = torchvision_reason.startswith("Unsupported image file")
        reason = str(error) if unsupported_by_torchvision else torchvision_reason
    raise ImageDecodeError(f"{path}: cannot decode image ({reason}); re-extract or replace the file")


class VOCDetection(torch.utils.data.Dataset):
    """Images and annotations listed by one or more VOC-layout (voc_root, split) pairs.

    All annotations are parsed at construction, so a bad or missing file fails now, named, rather than
    hours into training. Difficult objects are kept (as the seed did): evaluation needs them to ignore
    matches, and `TrainTransform(use_difficult=False)` drops them from training targets.

    An image whose decoded size disagrees with its XML <size>: the decoded pixels are trusted (they are
    what the model sees), the boxes are clipped to them and a warning names the file. `annotations`
    keeps the XML's view, since checking every image's size at construction would decode them all.

    `cache_images()` decodes every image once into RAM; loader workers forked afterwards share those
    pages with the training process (copy-on-write) instead of decoding each image again every epoch.

    An image that cannot be decoded raises ImageDecodeError, or with `skip_unreadable` gives None and a
    warning line naming it (`collate_detection` leaves it out of its batch): training loses one image, not an
    epoch.
    """

    def __init__(self, sources, class_names=VOC_CLASSES, transforms=None, skip_unreadable=False):
        self.class_names = tuple(class_names)
        self.transforms = transforms
        self.skip_unreadable = skip_unreadable
        self.image_ids, self.annotations, self._image_paths = [], [], []
        self._decoded = None
        for voc_root, split in sources:
            voc_root = Path(voc_root)
            split_file = voc_root / "ImageSets" / "Main" / f"{split}.txt"
            if not split_file.is_file():
                raise FileNotFoundError(f"split list {split_file} not found; {MISSING_DATA_HINT}")
            available_images = _list_dir(voc_root / "JPEGImages")
            for image_id in split_file.read_text().split():
                xml_path = voc_root / "Annotations" / f"{image_id}.xml"
                if not xml_path.is_file():
                    raise FileNotFoundError(f"annotation {xml_path} (listed in {split_file}) not found; "
                                            f"{MISSING_DATA_HINT}")
                if f"{image_id}.jpg" not in available_images:
                    raise FileNotFoundError(f"image {voc_root / 'JPEGImages' / image_id}.jpg (listed in "
                                            f"{split_file}) not found; {MISSING_DATA_HINT}")
                self.image_ids.append(image_id)
                self.annotations.append(read_voc_annotation(xml_path, self.class_names))
                self._image_paths.append(voc_root / "JPEGImages" / f"{image_id}.jpg")
        if not self.image_ids:
            split_files = [str(Path(root) / "ImageSets" / "Main" / f"{split}.txt") for root, split in sources]
            raise ValueError(f"{', '.join(split_files)} list(s) no images: add images to the split or fix data_dir")
        if len(set(self.image_ids)) != len(self.image_ids):
            raise ValueError(f"image ids repeat across {list(sources)}; each image may be listed only once")

    def __len__(self):
        return len(self.image_ids)

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
            annotation = clip_to_image(annotation, width, height, path)
        if self.transforms is not None:
            return self.transforms(image, annotation)
        return image, annotation


def _list_dir(folder):
    # One directory listing instead of one stat per image: VOC2012 has 17k images.
    try:
        return {entry.name for entry in Path(folder).iterdir()}
    except FileNotFoundError:
        raise FileNotFoundError(f"image folder {folder} not found; {MISSING_DATA_HINT}") from None


def read_class_names(path):
    """Class names from a text file, one per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class list {path} not found; {MISSING_DATA_HINT}")
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def build_dataset(protocol, data_dir, train, transforms=None, class_names=None):
    """The train or test set of a protocol (see PROTOCOLS).

    VOC protocols read data_dir/VOCdevkit/VOC2007 and VOC2012 with the 20 VOC classes; `synthetic`
    reads the VOC-layout folder data_dir itself (splits train / val) with classes from data_dir/classes.txt.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known protocols: {', '.join(PROTOCOLS)}")
    data_dir = Path(data_dir)
    if protocol == "synthetic":
        base = data_dir
        class_names = class_names or read_class_names(data_dir / "classes.txt")
    else:
        base = data_dir / "VOCdevkit"
        class_names = class_names or VOC_CLASSES
    sources = [(base / folder, split) for folder, split in PROTOCOLS[protocol]["train" if train else "test"]]
    return VOCDetection(sources, class_names=class_names, transforms=transforms)
