"""Real aerial photographs with real labels, as a small own-data set: the NEON tree-crown crops that deepforest's
wheel (MIT) ships with the VOC XML their labelling tool wrote, cut into square tiles in VOC layout.

    python -m pip download --no-deps deepforest==2.1.0 -d ~/.cache/yolov1     # what `make neon-tiles` does
    python data/neon_tiles.py --wheel ~/.cache/yolov1/deepforest-2.1.0-py3-none-any.whl --out data/neon_tiles

The wheel is read as the zip file it is (nothing installed). Every annotated crop (OSBS_029, SOAP_061 and two
Yellowstone crops: 951 crowns) is cut into --tile x --tile pixel tiles, left to right and top to bottom; a tile
that would run past the crop's edge is left out. Every crown is one class, `tree` (SOAP_061's file says Alive or
Dead). A crown cut by a tile's edge is kept, clipped to the tile, when at least --min_visible of its box lies in
the tile, and left out otherwise; tiles without a crown are left out. The tiles are split at random (--seed) into
train and val (--val_fraction of them). The tiles are PNGs, as the crops are: no JPEG loss added.
"""
import argparse
import io
import random
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for data.make_synthetic
from data.make_synthetic import annotation_xml, make_voc_dirs  # noqa: E402

CLASS_NAME = "tree"
DATA_FOLDER = "deepforest/data/"


def annotated_crops(wheel: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB pixels, (K, 4) VOC boxes) of every crop in the wheel with an XML file and a PNG of that name."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        crops = []
        for xml_name in sorted(name for name in names if name.startswith(DATA_FOLDER) and name.endswith(".xml")):
            png_name = str(PurePosixPath(xml_name).with_suffix(".png"))
            if png_name not in names:
                continue
            pixels = np.array(Image.open(io.BytesIO(archive.read(png_name))).convert("RGB"))
            boxes = [[float(element.findtext(f"bndbox/{tag}")) for tag in ("xmin", "ymin", "xmax", "ymax")]
                     for element in ET.fromstring(archive.read(xml_name)).iter("object")]
            crops.append((PurePosixPath(xml_name).stem, pixels, np.array(boxes, dtype=np.float64).reshape(-1, 4)))
    if not crops:
        raise SystemExit(f"error: {wheel} holds no annotated crop under {DATA_FOLDER}: is it deepforest's wheel?")
    return crops


def tile_boxes(boxes: np.ndarray, left: int, top: int, tile: int, min_visible: float) -> np.ndarray:
    """The VOC boxes (1-based inclusive pixels) of the crowns kept in the tile at (left, top), in its pixels."""
    shifted = boxes - [left, top, left, top]
    clipped = np.clip(shifted, 1, tile)
    area = (shifted[:, 2] - shifted[:, 0] + 1) * (shifted[:, 3] - shifted[:, 1] + 1)
    visible = np.clip(clipped[:, 2] - clipped[:, 0] + 1, 0, None) * np.clip(clipped[:, 3] - clipped[:, 1] + 1, 0, None)
    return clipped[(visible >= min_visible * area) & (visible > 0)]


def write_tiles(wheel: Path, out: Path, tile: int, min_visible: float, val_fraction: float, seed: int) -> dict:
    """Write the VOC-layout set; returns each split's tile and crown counts."""
    root = make_voc_dirs(out)
    tiles = []
    for name, pixels, boxes in annotated_crops(wheel):
        height, width = pixels.shape[:2]
        for top in range(0, height - tile + 1, tile):
            for left in range(0, width - tile + 1, tile):
                kept = tile_boxes(boxes, left, top, tile, min_visible)
                if len(kept) == 0:
                    continue
                image_id = f"{name}_{top}_{left}".replace(" ", "_")
                Image.fromarray(pixels[top:top + tile, left:left + tile]).save(root / "JPEGImages" / f"{image_id}.png")
                objects = [{"name": CLASS_NAME, "bndbox": [f"{value:g}" for value in box], "difficult": False}
                           for box in kept]
                (root / "Annotations" / f"{image_id}.xml").write_text(annotation_xml(f"{image_id}.png", tile, tile,
                                                                                     objects, folder="neon_tiles"))
                tiles.append((image_id, len(kept)))
    random.Random(seed).shuffle(tiles)
    val_count = round(val_fraction * len(tiles))
    splits = {"train": sorted(tiles[val_count:]), "val": sorted(tiles[:val_count])}
    for split, chosen in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{image_id}\n" for image_id, _ in chosen))
    (root / "classes.txt").write_text(f"{CLASS_NAME}\n")
    return {split: (len(chosen), sum(count for _, count in chosen)) for split, chosen in splits.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, required=True, help="deepforest-2.1.0-py3-none-any.whl")
    parser.add_argument("--out", type=Path, default=Path("data/neon_tiles"), help="output folder (VOC layout)")
    parser.add_argument("--tile", type=int, default=200, help="tile side in pixels")
    parser.add_argument("--min_visible", type=float, default=0.5,
                        help="fraction of a crown's box that must lie in a tile for the tile to keep it")
    parser.add_argument("--val_fraction", type=float, default=0.2, help="fraction of the tiles in val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    args = parser.parse_args(argv)
    if not args.wheel.is_file():
        raise SystemExit(f"error: --wheel {args.wheel} does not exist: fetch it with "
                         f"python -m pip download --no-deps deepforest==2.1.0 -d {args.wheel.parent}")
    counts = write_tiles(args.wheel, args.out, args.tile, args.min_visible, args.val_fraction, args.seed)
    print(", ".join(f"{split}: {tiles} tiles, {crowns} crowns" for split, (tiles, crowns) in counts.items())
          + f"; wrote {args.out}")


if __name__ == "__main__":
    main()
