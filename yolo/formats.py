"""Detection data on disk: the three layouts read for your own data (protocol=custom), and their readers.

data_dir holds one of them; data_format=auto picks the one it finds (data.yaml: YOLO,
annotations/instances_*.json: COCO, ImageSets/Main: VOC). Splits have any names (train_split, val_split).
Images are any format PIL reads (JPEG, PNG, BMP, TIFF, WebP, ...), decoded by content whatever the extension.

VOC (data_format=voc)
    data_dir/classes.txt                    class names, one per line, in the order the model numbers them
    data_dir/ImageSets/Main/<split>.txt     image ids, one per line (spaces inside an id are kept)
    data_dir/Annotations/<id>.xml           VOC XML: <size> <width> <height> (missing or 0 x 0: the image's
                                            own, read from its header); per <object>: <name>, optional
                                            <difficult> 1, <bndbox> xmin ymin xmax ymax in 1-based inclusive
                                            pixels (xmax - xmin + 1 columns); <part> boxes are not objects
    data_dir/JPEGImages/<id>.<any extension>  exactly one file per id

COCO (data_format=coco)
    data_dir/annotations/instances_<split>.json   COCO instances: "images" (id, file_name, width, height),
                                            "annotations" (image_id, category_id, bbox [x, y, w, h] in 0-based
                                            continuous pixels, optional iscrowd), "categories" (id, name)
    data_dir/images/<split>/<file_name>     or data_dir/<split>/<file_name> (COCO's own val2017/ beside
                                            annotations/); file_name may hold sub-folders
    Classes are the categories in the file's order; category ids are any distinct integers. iscrowd=1 marks
    a crowd region: never a training target (whatever use_difficult says), and in the metrics a region where
    detections are neither right nor wrong, as pycocotools treats it (COCO AP) and as a difficult object
    (VOC AP). An image without annotations has no objects.

YOLO (data_format=yolo)
    data_dir/data.yaml                      names: a list (class id = position) or a mapping id -> name;
                                            <split>: an image folder (searched recursively), a .txt list of
                                            image paths (relative to the list's folder), or a list of these;
                                            relative to `path`, itself relative to data_dir (default: data_dir)
    labels                                  the image's path with its last `images` folder replaced by `labels`
                                            and its extension by .txt (beside the image when no folder is
                                            called images); one line per object: class cx cy w h, the box's
                                            centre and size divided by the image's width and height
    An image without a label file has no objects. YOLO has no difficult flag.

Every reader gives the same thing: per image an id (VOC: the listed id; COCO: file_name without its extension;
YOLO: the path below the split's folder or list, without extension), its file and an annotation dict in the one
box convention the rest of the code uses, VOC's (yolo.boxes). Each states the bridge it assumes. Every problem
found (a malformed file, a missing image, an unknown class, a degenerate box) is collected with its file and
line (JSON: the entry) and all are reported in one AnnotationError.
"""
import json
import math
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import NamedTuple
from xml.parsers import expat

import numpy as np
import yaml

from yolo.box_formats import coco_to_voc, yolo_to_voc
from yolo.imagecheck import IMAGE_SUFFIXES, THREADS, header_size

DATA_FORMATS = ("voc", "coco", "yolo")
MISSING_DATA_HINT = ("run `make download` for VOC, or `python data/make_synthetic.py --out DIR` for a synthetic set "
                     "(`make demo` for the whole demo); for your own data set protocol=custom and lay data_dir out "
                     "in VOC, COCO or YOLO layout (yolo/formats.py describes them); or check data_dir")
MAX_LISTED_PROBLEMS = 20
CLASS_LIST_ADVICE = "VOC: classes.txt; COCO: the JSON's categories; YOLO: data.yaml's names"
# How the problems with a class read: the class list's advice is for them.
CLASS_PROBLEMS = ("is not one of the dataset's classes", "is not in data.yaml's names", "is not among the categories")


class AnnotationError(ValueError):
    """Annotations that cannot be used. `problems` holds each as 'file:line: what' (JSON: which entry); the
    message lists the first MAX_LISTED_PROBLEMS of them, counts the rest and says what to do."""

    def __init__(self, problems, class_names=None):
        self.problems = list(problems)
        lines = [f"{len(self.problems)} problem(s) in the dataset's files"
                 + (f" (its classes: {', '.join(class_names)})" if class_names else "") + ":"]
        lines += [f"  {problem}" for problem in self.problems[:MAX_LISTED_PROBLEMS]]
        if len(self.problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  and {len(self.problems) - MAX_LISTED_PROBLEMS} more")
        about_classes = any(marker in problem for problem in self.problems for marker in CLASS_PROBLEMS)
        lines.append("Fix them" + (f" (an unknown class: the label, or the class list: {CLASS_LIST_ADVICE})"
                                   if about_classes else "") + ", or leave those images out of the split.")
        super().__init__("\n".join(lines))


class Sample(NamedTuple):
    """One image of a split. `annotation`: boxes float32 (M, 4) VOC pixels as written (unclipped), labels
    int64 (M,), difficult bool (M,), crowd bool (M,: COCO's iscrowd; crowd regions are also difficult), refs
    (M strings: each object as its file names it, for messages), width and height of the image."""

    image_id: str
    image_path: Path
    annotation: dict
    source: str  # the annotation's file, named in warnings about its boxes
    file_id: int | str | None = None  # the image's id in its file where it has one of its own (COCO's)


def detect_format(data_dir) -> str:
    """The layout data_dir holds: yolo, coco or voc (see the module docstring); an error if none or several."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {data_dir} not found; {MISSING_DATA_HINT}")
    found = [name for name, present in (
        ("yolo", (data_dir / "data.yaml").is_file()),
        ("coco", any((data_dir / "annotations").glob("instances_*.json"))),
        ("voc", (data_dir / "ImageSets" / "Main").is_dir())) if present]
    if not found:
        raise FileNotFoundError(f"{data_dir} holds no data.yaml (YOLO), annotations/instances_<split>.json (COCO) or "
                                f"ImageSets/Main/ (VOC); {MISSING_DATA_HINT}")
    if len(found) > 1:
        raise ValueError(f"{data_dir} holds the {' and '.join(found)} layouts: set data_format to the one to read")
    return found[0]


def read_splits(data_format, sources, class_names=None):
    """(class names, samples, class ids) of the (root, split) pairs `sources` in `data_format` (voc, coco or yolo;
    voc_images: a VOC split's images alone, without annotations).

    Without `class_names` the dataset's own list is used (VOC: the first root's classes.txt); with them (a
    checkpoint's, or the training set's for its validation set) labels are mapped to them by name. The class
    ids are the file's own for each class (COCO: category ids; YOLO: data.yaml's names; VOC, which has none:
    the class's place in the list, from 1). Raises AnnotationError listing every problem of every file,
    FileNotFoundError for a missing split.
    """
    reader = {"voc": read_voc, "voc_images": partial(read_voc, annotated=False), "coco": read_coco,
              "yolo": read_yolo}[data_format]
    problems, samples, file_ids = [], [], {}
    for root, split in sources:
        class_names, split_samples = reader(Path(root), split, class_names, problems, file_ids)
        samples += split_samples
    if problems:
        raise AnnotationError(problems, class_names)
    return tuple(class_names), samples, [file_ids.get(name, index + 1) for index, name in enumerate(class_names)]


def read_class_names(path):
    """Class names from a text file, one per line (blank lines ignored, spaces inside a name kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class list {path} not found; {MISSING_DATA_HINT}")
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _names_in(folder):
    # One directory listing instead of one stat per image: VOC2012 has 17k images.
    try:
        return {entry.name for entry in Path(folder).iterdir()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _annotation(boxes, labels, difficult, width, height, refs, crowd=None):
    difficult = np.asarray(difficult, dtype=bool)
    return {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64), "difficult": difficult,
            "crowd": np.zeros_like(difficult) if crowd is None else np.asarray(crowd, dtype=bool),
            "refs": list(refs), "width": width, "height": height}


def has_area_inside(boxes, width, height):
    """Which VOC-pixel boxes keep some area inside a width x height image once clipped to it. A box under a
    pixel wide or high still has area (a COCO bbox of width 0.6 gives x2 = x1 - 0.4); only one wholly outside
    the image has none."""
    return ((np.minimum(boxes[:, 2], width) - np.maximum(boxes[:, 0], 1) + 1 > 0)
            & (np.minimum(boxes[:, 3], height) - np.maximum(boxes[:, 1], 1) + 1 > 0))


# --- VOC

def read_voc(root, split, class_names, problems, file_ids, annotated=True):
    """A VOC-layout split; boxes are VOC's own convention already. Not `annotated`: the split's images alone,
    without objects, sized from their headers (the VOC2012 test set, whose annotations the server keeps)."""
    class_names = class_names or read_class_names(root / "classes.txt")
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"split list {split_file} not found; {MISSING_DATA_HINT}")
    # One id per line: only the line's ends are stripped, so an id may hold spaces.
    listed = [(number, line.strip()) for number, line in
              enumerate(split_file.read_text(encoding="utf-8").splitlines(), start=1) if line.strip()]
    if not listed:
        raise ValueError(f"{split_file} lists no images: add image ids to it, or fix data_dir or the split name")
    for folder in (root / "Annotations", root / "JPEGImages")[0 if annotated else 1:]:
        if not folder.is_dir():
            raise FileNotFoundError(f"folder {folder} not found; {MISSING_DATA_HINT}")
    images_by_id = {}
    for name in _names_in(root / "JPEGImages"):
        images_by_id.setdefault(name.rpartition(".")[0], []).append(name)
    xml_files = _names_in(root / "Annotations")
    samples = []
    for number, image_id in listed:
        where = f"{split_file}:{number}"
        images = sorted(images_by_id.get(image_id, []))
        if annotated and f"{image_id}.xml" not in xml_files:
            problems.append(f"{where}: annotation {root / 'Annotations' / image_id}.xml not found")
        elif not images:
            problems.append(f"{where}: image {root / 'JPEGImages' / image_id}.* not found")
        elif len(images) > 1:
            problems.append(f"{where}: {len(images)} images for this id in {root / 'JPEGImages'} "
                            f"({', '.join(images)}); keep one")
        elif not annotated:
            size = header_size(root / "JPEGImages" / images[0])
            if isinstance(size, str):
                problems.append(f"{where}: image {root / 'JPEGImages' / images[0]}: {size}")
                continue
            samples.append(Sample(image_id, root / "JPEGImages" / images[0], _annotation([], [], [], *size, refs=[]),
                                  str(split_file)))
        else:
            xml_path = root / "Annotations" / f"{image_id}.xml"
            try:
                annotation = read_voc_annotation(xml_path, class_names)
            except AnnotationError as error:
                problems += error.problems
                continue
            if annotation["width"] is None:  # no <size>, or 0 x 0 as some tools write it: the image's own
                size = header_size(root / "JPEGImages" / images[0])
                if isinstance(size, str):
                    problems.append(f"{xml_path}: no <size>, and image {root / 'JPEGImages' / images[0]}: {size}")
                    continue
                annotation["width"], annotation["height"] = size
            samples.append(Sample(image_id, root / "JPEGImages" / images[0], annotation, str(xml_path)))
    return class_names, samples


def read_voc_annotation(xml_path, class_names):
    """One VOC XML file -> annotation dict (Sample's). Only direct <object>/<bndbox> elements are objects (the
    <part> boxes inside a person are not); an object without <difficult> is not difficult, as for the devkit.
    Raises AnnotationError listing every problem of the file with its line."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as error:
        raise AnnotationError([f"{xml_path}:{error.position[0]}: cannot parse the XML ({error}); re-extract or "
                               f"fix it"], class_names) from None
    except OSError as error:
        raise AnnotationError([f"{xml_path}: cannot read it ({error.strerror})"], class_names) from None
    found = []  # (element, what is wrong): lines are looked up only when something is

    def number(parent, path):
        text = parent.findtext(path)
        value = _float(text)
        if value is None:
            found.append((parent, f"<{path}> missing" if text is None else f"<{path}> is {text!r}, not a number"))
        return value

    # A missing <size> or one of 0 x 0 (written by some tools) is left to the caller to take from the image.
    unsized = root.find("size") is None or [root.findtext(f"size/{side}", "").strip() for side in
                                            ("width", "height")] in (["0", "0"], ["", ""])
    width, height = (None, None) if unsized else (number(root, "size/width"), number(root, "size/height"))
    if width is not None and height is not None and (width <= 0 or height <= 0):
        found.append((root, f"image size {width:g} x {height:g} is not positive"))
    class_index = {name: index for index, name in enumerate(class_names)}
    boxes, labels, difficult, refs = [], [], [], []
    for position, obj in enumerate(root.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if obj.find("bndbox") is None:
            found.append((obj, "<bndbox> missing"))
            box = [None]
        else:
            box = [number(obj, f"bndbox/{tag}") for tag in ("xmin", "ymin", "xmax", "ymax")]
        if name not in class_index:
            found.append((obj, f"class {name!r} is not one of the dataset's classes"))
        elif None not in box and (box[2] < box[0] or box[3] < box[1]):
            found.append((obj, f"degenerate box xmin {box[0]:g} ymin {box[1]:g} xmax {box[2]:g} ymax {box[3]:g}: "
                               f"VOC boxes are 1-based inclusive, xmax >= xmin and ymax >= ymin"))
        elif None not in box:
            boxes.append(box)
            labels.append(class_index[name])
            difficult.append((obj.findtext("difficult") or "0").strip() == "1")
            refs.append(f"<object> {position} ({name} {' '.join(f'{value:g}' for value in box)})")
    if found:
        line_of = dict(zip(map(id, root.iter()), _start_lines(xml_path)))
        raise AnnotationError([f"{xml_path}:{line_of[id(element)]}: {what}" for element, what in found], class_names)
    return _annotation(boxes, labels, difficult, None if unsized else int(width), None if unsized else int(height),
                       refs)


def _float(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _start_lines(xml_path):
    """The line of each element's start tag, in document order (the order of Element.iter())."""
    lines = []
    parser = expat.ParserCreate()
    parser.StartElementHandler = lambda name, attributes: lines.append(parser.CurrentLineNumber)
    with open(xml_path, "rb") as file:
        parser.ParseFile(file)
    return lines


# --- COCO

def read_coco(root, split, class_names, problems, file_ids):
    """A COCO-layout split. bbox [x, y, w, h] (0-based continuous pixels) -> VOC by yolo.box_formats.coco_to_voc:
    x1 = x + 1, y1 = y + 1, x2 = x + w, y2 = y + h (mmdetection's bridge: whole-pixel boxes round-trip
    exactly; files from converters that write x = xmin, w = xmax - xmin come out within a pixel)."""
    json_path = root / "annotations" / f"instances_{split}.json"
    if not json_path.is_file():
        raise FileNotFoundError(f"COCO annotations {json_path} not found; {MISSING_DATA_HINT}")
    image_dir = next((folder for folder in (root / "images" / split, root / split) if folder.is_dir()), None)
    if image_dir is None:
        raise FileNotFoundError(f"image folder {root / 'images' / split} (or {root / split}) not found; "
                                f"{MISSING_DATA_HINT}")
    try:
        data = json.loads(json_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problems.append(f"{json_path}:{getattr(error, 'lineno', 1)}: not valid JSON "
                        f"({getattr(error, 'msg', None) or error})")
        return class_names, []
    if not (isinstance(data, dict) and all(isinstance(data.get(key), list)
                                           for key in ("images", "annotations", "categories"))):
        problems.append(f"{json_path}: a COCO instances file is an object with lists images, annotations and "
                        f"categories")
        return class_names, []
    if not data["images"]:
        raise ValueError(f"{json_path} lists no images: add them, or fix data_dir or the split name")
    file_classes, category_names = [], {}
    for position, category in enumerate(data["categories"]):
        where = f"{json_path}: categories[{position}]"
        if not (isinstance(category, dict) and _is_int(category.get("id")) and isinstance(category.get("name"), str)):
            problems.append(f"{where}: needs an integer id and a string name")
        elif category["id"] in category_names or category["name"] in file_classes:
            problems.append(f"{where}: id {category['id']} or name {category['name']!r} repeats")
        else:
            category_names[category["id"]] = category["name"]
            file_classes.append(category["name"])
    class_names = tuple(class_names or file_classes)
    for category_id, name in category_names.items():
        file_ids.setdefault(name, category_id)
    images = _coco_images(data["images"], json_path, image_dir, problems)
    for position, entry in enumerate(data["annotations"]):
        entry = entry if isinstance(entry, dict) else {}
        problem = _coco_object_problem(entry, images, category_names, class_names)
        if problem:
            problems.append(f"{json_path}: annotation id {entry.get('id')} (annotations[{position}]): {problem}")
        elif images[entry["image_id"]]["usable"]:
            image = images[entry["image_id"]]
            image["boxes"].append(entry["bbox"])
            image["labels"].append(class_names.index(category_names[entry["category_id"]]))
            image["crowd"].append(entry.get("iscrowd", 0) == 1)
            image["refs"].append(f"annotation id {entry.get('id')} (bbox {entry['bbox']})")
    return class_names, [
        Sample(Path(image["file_name"]).with_suffix("").as_posix(), image_dir / image["file_name"],
               _annotation(coco_to_voc(np.asarray(image["boxes"], dtype=np.float64)), image["labels"],
                           image["crowd"], image["width"], image["height"], image["refs"], crowd=image["crowd"]),
               f"{json_path} (image id {image_id})", image_id)
        for image_id, image in images.items() if image["usable"]]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _coco_images(entries, json_path, image_dir, problems):
    """Image id -> the image's fields and (empty) object lists. `usable` is False for an entry with a problem;
    its annotations are still checked, then left out."""
    listings, images = {}, {}
    for position, image in enumerate(entries):
        where = f"{json_path}: images[{position}]"
        if not (isinstance(image, dict) and _is_int(image.get("id")) and isinstance(image.get("file_name"), str)
                and image["file_name"]):
            problems.append(f"{where}: needs an integer id and a string file_name")
            continue
        where += f" (id {image['id']})"
        if image["id"] in images:
            problems.append(f"{where}: the image id repeats")
            continue
        path = image_dir / image["file_name"]
        if path.parent not in listings:
            listings[path.parent] = _names_in(path.parent)
        size_ok = all(_is_int(image.get(key)) and image[key] > 0 for key in ("width", "height"))
        if not size_ok:
            problems.append(f"{where}: width and height must be positive integers")
        elif path.name not in listings[path.parent]:
            problems.append(f"{where}: image {path} not found")
        images[image["id"]] = {"file_name": image["file_name"], "width": image.get("width"),
                               "height": image.get("height"), "usable": size_ok and path.name in listings[path.parent],
                               "boxes": [], "labels": [], "crowd": [], "refs": []}
    return images


def _coco_object_problem(entry, images, category_names, class_names):
    """What is wrong with one COCO annotation, or None."""
    bbox = entry.get("bbox")
    numbers = [_float(value) for value in bbox] if isinstance(bbox, list) and len(bbox) == 4 else [None]
    name = category_names.get(entry.get("category_id")) if _is_int(entry.get("category_id")) else None
    if not _is_int(entry.get("image_id")) or entry["image_id"] not in images:
        return f"image_id {entry.get('image_id')!r} is not among the images"
    if name is None:
        return f"category_id {entry.get('category_id')!r} is not among the categories"
    if name not in class_names:
        return f"class {name!r} (category_id {entry['category_id']}) is not one of the dataset's classes"
    if None in numbers:
        return f"bbox {bbox!r} is not four numbers [x, y, w, h]"
    if numbers[2] <= 0 or numbers[3] <= 0:
        return f"degenerate bbox {bbox}: width and height must be positive"
    if entry.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd is {entry['iscrowd']!r}, not 0 or 1"
    return None


# --- YOLO

def read_yolo(root, split, class_names, problems, file_ids):
    """A YOLO-layout split. cx, cy, w, h normalised -> VOC by yolo.box_formats.yolo_to_voc: the continuous box
    [(cx - w/2) W, (cx + w/2) W] gives x1 = (cx - w/2) W + 1, x2 = (cx + w/2) W (likewise in y), as the COCO
    bridge. The image's width and height, which the labels do not carry, are read from its header."""
    yaml_path = root / "data.yaml"
    if not yaml_path.is_file():
        raise FileNotFoundError(f"{yaml_path} not found; {MISSING_DATA_HINT}")
    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problems.append(f"{yaml_path}:{mark.line + 1 if mark else 1}: not valid YAML "
                        f"({getattr(error, 'problem', None) or error})")
        return class_names, []
    names = config.get("names") if isinstance(config, dict) else None
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not (isinstance(names, dict) and names and all(_is_int(key) for key in names)):
        problems.append(f"{yaml_path}: names must be a list of class names or a mapping of class id to name")
        return class_names, []
    names = {class_id: str(name) for class_id, name in sorted(names.items())}
    class_names = tuple(class_names or names.values())
    for class_id, name in names.items():
        file_ids.setdefault(name, class_id)
    if config.get(split) is None:
        problems.append(f"{yaml_path}: no {split!r} entry (the split's image folder or list of images)")
        return class_names, []
    base = root / str(config.get("path") or "")
    images = []
    for entry in config[split] if isinstance(config[split], list) else [config[split]]:
        images += _yolo_split_images(base, str(entry), yaml_path, split)
    if not images:
        raise ValueError(f"{yaml_path}: split {split!r} ({config[split]}) holds no {'/'.join(IMAGE_SUFFIXES)} images")
    with ThreadPoolExecutor(THREADS) as pool:
        sizes = list(pool.map(header_size, [path for _, path in images]))
    samples = []
    for (image_id, path), size in zip(images, sizes):
        if isinstance(size, str):
            problems.append(f"{path}: {size}")
            continue
        label_path = yolo_label_path(path)
        labels, boxes, refs = _yolo_labels(label_path, names, class_names, problems)
        samples.append(Sample(image_id, path, _annotation(yolo_to_voc(boxes, *size), labels, [False] * len(labels),
                                                          *size, refs), str(label_path)))
    return class_names, samples


def _yolo_split_images(base, entry, yaml_path, split):
    """(image id, path) of a split entry: a folder (searched recursively) or a .txt list of image paths."""
    path = base / entry
    if not path.exists() and entry.startswith("../"):  # as ultralytics does, for Roboflow's exports
        path = base / entry[3:]
    if path.is_dir():
        found = sorted(file for file in path.rglob("*") if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file())
        return [(file.relative_to(path).with_suffix("").as_posix(), file) for file in found]
    if path.is_file():
        listed = [path.parent / line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [(_relative_or_whole(file, path.parent).with_suffix("").as_posix(), file) for file in listed]
    raise FileNotFoundError(f"{path} ({split!r} in {yaml_path}) not found: the split names an image folder or a "
                            f".txt list of images")


def _relative_or_whole(path, folder):
    return path.relative_to(folder) if path.is_relative_to(folder) else path


def yolo_label_path(image_path):
    """Ultralytics' rule: the last folder named `images` becomes `labels`, and the extension .txt."""
    folders = list(image_path.parent.parts)
    if "images" in folders:
        folders[len(folders) - 1 - folders[::-1].index("images")] = "labels"
    return Path(*folders, image_path.stem + ".txt")


def _yolo_labels(label_path, names, class_names, problems):
    """(labels, normalised cx cy w h rows, refs) of one label file; none when the file does not exist."""
    try:
        text = label_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], [], []
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"{label_path}: cannot read it ({error})")
        return [], [], []
    labels, rows, refs = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        where = f"{label_path}:{number}"
        values = [_float(field) for field in fields]
        if not fields:
            continue
        if len(fields) != 5 or None in values or not values[0].is_integer():
            problems.append(f"{where}: {line.strip()!r} is not 'class cx cy w h' (a class id and four numbers)")
        elif int(values[0]) not in names:
            problems.append(f"{where}: class id {int(values[0])} is not in data.yaml's names (ids "
                            f"{', '.join(map(str, names))})")
        elif names[int(values[0])] not in class_names:
            problems.append(f"{where}: class {names[int(values[0])]!r} is not one of the dataset's classes")
        elif not all(0 <= value <= 1 for value in values[1:]):
            problems.append(f"{where}: cx cy w h must be normalised to [0, 1] by the image's width and height")
        elif values[3] <= 0 or values[4] <= 0:
            problems.append(f"{where}: degenerate box: w and h must be positive")
        else:
            labels.append(class_names.index(names[int(values[0])]))
            rows.append(values[1:])
            refs.append(f"line {number} ({' '.join(fields)})")
    return labels, rows, refs
