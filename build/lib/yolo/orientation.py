"""EXIF orientation: images are read as they are displayed.

Phones and cameras store the pixels as the sensor read them and add a tag saying how to turn them for display
(EXIF Orientation, 1 to 8). Viewers, annotation tools (CVAT, Label Studio, LabelImg) and ultralytics show and
label the turned image, so every decode here applies the tag and every header size is the displayed one: boxes
of every layout are read in the displayed frame.
"""
from PIL import ExifTags, Image

SWAPS_SIDES = (5, 6, 7, 8)  # a quarter turn or a transposition: the displayed width is the stored height
# The formats whose tag this module applies. Pillow's TIFF plugin applies its own tag when it loads the pixels
# (and gives the displayed size from the header); BMP and GIF carry none.
TAGGED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")  # MPO: how Pillow names many phones' JPEGs (several pictures)
# What is left after the transposition of orientations 5-8 (orientation - 4): the dims to flip of (..., H, W).
FLIPS = {2: (-1,), 3: (-2, -1), 4: (-2,)}


def header_orientation(image: Image.Image):
    """The orientation tag of an opened image: 1 when it has none or a damaged EXIF block, else the tag's value as
    the file gives it (one that is not 2-8 turns nothing).

    Only the header is read; open the image with Pillow's warnings about damaged metadata ignored (see
    `yolo.imagecheck.header_size`), or each read repeats them. A PNG's tag counts when it comes before the
    pixels, where the PNG specification puts it and torchvision's decoder reads it; looking for one after them
    would decode the whole file.
    """
    if image.format not in TAGGED_FORMATS or (image.format == "PNG" and "exif" not in image.info):
        return 1
    try:
        return image.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):  # a damaged EXIF block: as if it had none
        return 1


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as displayed, from its header."""
    width, height = image.size
    return (height, width) if header_orientation(image) in SWAPS_SIDES else (width, height)


def upright(pixels, orientation):
    """Stored pixels (a (..., H, W) tensor) turned as `orientation` says (values other than 2-8 turn nothing):
    the displayed image, as PIL.ImageOps.exif_transpose gives it."""
    if orientation in SWAPS_SIDES:
        pixels, orientation = pixels.transpose(-2, -1), orientation - 4
    flips = FLIPS.get(orientation)
    return pixels.flip(flips) if flips else pixels.contiguous()
