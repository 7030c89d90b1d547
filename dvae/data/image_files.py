"""Reading one image file safely: only the formats dvae knows, only regular files, every pixel type
converted to 8-bit RGB, and one sentence naming the file when it cannot be read."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from dvae.errors import TrainingError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# What Pillow may open, whatever a file is named (it goes by the content): the formats of the extensions above,
# tar shards' .ppm, and MPO (a JPEG with extra frames, as cameras write). Others stay shut: EPS runs Ghostscript.
IMAGE_FORMATS = ("BMP", "GIF", "JPEG", "MPO", "PNG", "PPM", "TIFF", "WEBP")


def open_image(file: Path | IO[bytes]) -> Image.Image:
    """`Image.open` limited to IMAGE_FORMATS."""
    Image.init()
    return Image.open(file, formats=[name for name in IMAGE_FORMATS if name in Image.OPEN])


def read_rgb(path: Path) -> Tensor:
    """uint8 [3, H, W]; EXIF rotation applied, see `rgb_array` for the conversion. Raises OSError naming the
    file for anything that cannot be read, whatever the decoder raised."""
    try:
        with open_regular(path) as file:
            try:
                with open_image(file) as image:
                    array = rgb_array(ImageOps.exif_transpose(image))
            except UnidentifiedImageError:
                if path.suffix.lower() not in (".tif", ".tiff"):  # Pillow's message names a file object
                    raise OSError("not an image format Pillow can read, or damaged") from None
                file.seek(0)
                array = read_tiff(file)  # e.g. a float RGB TIFF, which Pillow does not read
    except Exception as error:  # a decoder fails in many ways on a damaged file; none of them is a bug here
        raise OSError(f"could not read image {path}: {one_line(error)}") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def header_problem(path: Path) -> str | None:
    """Why `path` is not an image file Pillow (or tifffile) can open, from its header alone (cheap: nothing is
    decoded), or None. A file damaged past its header is found only when it is decoded."""
    try:
        with open_regular(path) as file:
            try:
                with open_image(file):
                    return None
            except UnidentifiedImageError:
                if path.suffix.lower() in (".tif", ".tiff"):
                    return None  # read_tiff reads what Pillow does not; decoding tells
                return "not an image format Pillow can read, or damaged"
    except Exception as error:  # as in read_rgb: a damaged file fails in many ways
        return one_line(error)


def open_regular(path: Path):
    """`path` opened for binary reading, refused unless it is a regular file: opening a FIFO for reading
    would wait for a writer forever (O_NONBLOCK makes the open return at once)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def read_tiff(file) -> np.ndarray:
    """The first page of a TIFF as uint8 [H, W, 3], read with tifffile (installed with scikit-image)."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(file.read())) as tiff:  # tifffile needs a named file or a buffer
        page = tiff.pages[0]
        array = page.asarray()
        if page.axes.startswith("S"):  # planar storage: samples first
            array = np.moveaxis(array, 0, -1)
    return to_rgb(to_uint8(array))


def rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3]: grey repeated, palettes expanded, alpha dropped. Pillow's convert("RGB") clips
    16-bit, 32-bit and float pixels to 0..255 (a float image in [0, 1] would come out black), so those
    modes ("I;16*", "I", "F") are scaled by their value range instead (`to_uint8`)."""
    if image.mode == "F" or image.mode.startswith("I"):
        return to_rgb(to_uint8(np.asarray(image)))
    return np.asarray(image.convert("RGB"))


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Pixels scaled from the range of their type to 0..255: floats are taken to be in [0, 1] (as in
    scikit-image; outside values are clipped, NaN is 0), unsigned and signed integers span 0..max of their
    type. A 32-bit integer image whose values all fit in 16 bits is taken as 16-bit: that is how Pillow
    holds 16-bit pixels in mode "I"."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "b":
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "f":
        unit = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0).clip(0, 1)
    elif array.dtype.kind in "iu":
        top = np.iinfo(array.dtype).max
        if array.dtype.itemsize > 2 and array.max(initial=0) <= 65535:
            top = 65535
        unit = array.clip(0, None) / top
    else:
        raise ValueError(f"pixels of type {array.dtype} are not supported")
    return np.rint(unit * 255).astype(np.uint8)


def to_rgb(array: np.ndarray) -> np.ndarray:
    """[H, W] or [H, W, C] -> [H, W, 3]: grey (with or without alpha) repeated, alpha dropped."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"an image of shape {list(array.shape)} is neither grey nor RGB")
    if array.shape[-1] <= 2:
        return np.repeat(array[..., :1], 3, axis=-1)
    return array[..., :3]


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class UnreadableImage(TrainingError):
    """An image that could not be read during training: `data.on_bad_file=error`, or no image of a split
    readable any more. A DataLoader worker's error reaches the main process rebuilt from its whole
    traceback text (torch's ExceptionWrapper); only the sentence itself, the text's last line, is kept."""

    def __init__(self, message: str) -> None:
        if "\nOriginal Traceback" in message:
            message = message.rstrip().rpartition("\n")[2].partition(": ")[2]
        super().__init__(message)
