"""Any directory tree of image files (`data.root=PATH`), searched recursively.

Images are read from disk on access, the most recent ones kept decoded up to `data.cache_mb` per split
and data-loading process (a small folder is decoded once, not once per crop), converted to RGB (grey, palette,
RGBA, 16-bit, 32-bit and float images included, see `rgb_array`), upscaled with a warning if smaller
than the crop, then cropped: random crop + flip (or `data.augment=paper`) for training; for validation the
shorter side resized to the crop size and the centre square (`transforms.evaluation_view`, as dvae-eval and
dvae-encode). Symlinked folders are followed (each folder is read once, so a link loop ends); entries that are
not regular files (FIFOs, devices, broken links) are never opened.

The file list is cached (see `folder_index`), so a folder of millions of files is not walked at every
start. Before training, each split is read until its first readable image (`FileCheck`), so a split
without one fails now instead of mid-run. A file that cannot be read is skipped with one warning naming it
and another image is served in its place (`data.on_bad_file=skip`, the default), or stops the run (`error`):
before training with a ConfigError, mid-run with an `UnreadableImage` (a TrainingError).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from dvae.data.image_files import IMAGE_EXTENSIONS, UnreadableImage, one_line, read_rgb
from dvae.data.transforms import CroppedImages
from dvae.errors import ConfigError
from dvae.files import atomic_write

# v2: symlinked folders are listed and non-regular files are not (a v1 index is rebuilt)
INDEX_HEADER = "# dvae folder index v2"


def walk_images(root: Path) -> tuple[list[Path], int]:
    """Image files under `root`, sorted so the order is the same on every machine, and the count of all files.

    Hidden files and folders are skipped (e.g. macOS "._photo.jpg" resource forks are not images).
    Symlinked folders are followed; a folder reached a second time (a link loop, or two links to one
    folder) is not read again, with a warning. Image names that are not regular files (a FIFO would block
    the reader forever, a broken link cannot be read) are left out, with one warning.
    """
    images, seen, odd = [], 0, []
    walked: dict[tuple[int, int], Path] = {}
    # Linked folders wait until every real one is walked, so a folder is listed under its real path.
    pending, linked = [root], []
    while pending or linked:
        folder = pending.pop() if pending else linked.pop()
        try:
            info = folder.stat()
            if (info.st_dev, info.st_ino) in walked:
                warnings.warn(f"{folder} leads to {walked[info.st_dev, info.st_ino]}, which is already listed; "
                              "it is not read twice", stacklevel=2)
                continue
            walked[info.st_dev, info.st_ino] = folder
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            warnings.warn(f"could not list {folder} ({error.strerror or error}); it is skipped", stacklevel=2)
            continue
        subfolders, links = [], []
        for entry in entries:
            hidden = entry.name.startswith(".")
            if _is_dir(entry):
                if not hidden:
                    (links if entry.is_symlink() else subfolders).append(Path(entry.path))
                continue
            seen += 1
            if hidden or Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            (images if _is_file(entry) else odd).append(Path(entry.path))
        pending += reversed(subfolders)  # depth first, in name order
        linked += reversed(links)
    if odd:
        warnings.warn(f"{len(odd)} image name(s) under {root} are not regular files (a FIFO, device, socket or "
                      f"broken link) and are skipped, e.g. {odd[0]}", stacklevel=2)
    return sorted(images), seen


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()  # a regular file, or a link to one
    except OSError:
        return False


def default_index_path(root: Path) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dvae" / "folder-index"
    return cache / f"{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]}.txt"


def folder_index(root: Path, rescan: bool = False, index: Path | None = None) -> tuple[list[Path], int]:
    """`walk_images(root)`, cached in a text file (`data.index`, default ~/.cache/dvae/folder-index/).

    The cache is used while the root directory's modification time is unchanged (adding or removing an
    entry directly under the root changes it); after changes deeper in the tree, set `data.rescan=true`
    once. A listed file that has since disappeared is skipped like any unreadable file.
    """
    index = index or default_index_path(root)
    stamp = f"{INDEX_HEADER} root={root.resolve()} mtime_ns={root.stat().st_mtime_ns}"
    if not rescan and index.is_file():
        with index.open(encoding="utf-8") as file:
            header, _, seen = file.readline().rstrip("\n").rpartition(" seen=")
            if header == stamp:
                return [root / line.rstrip("\n") for line in file], int(seen)
    files, seen = walk_images(root)
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"{stamp} seen={seen}\n", *(f"{path.relative_to(root).as_posix()}\n" for path in files)]
        atomic_write(index, lambda file: file.write("".join(lines).encode("utf-8")))
    except OSError as error:  # a read-only home: work without the cache
        warnings.warn(f"could not write the folder index {index} ({error}); the folder is walked at every start",
                      stacklevel=2)
    return files, seen


class BadFiles:
    """Files that could not be read, collected from every DataLoader worker through one small text file
    per process in `folder`, so the main process can report them at the end."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.seen: set[str] = set()
        # The folder belongs to the process that made this object: it goes when the object is collected or
        # the interpreter exits, so a datamodule used outside a run leaves nothing behind in /tmp.
        # Workers (forked or unpickled copies) never remove it.
        self._cleanup = weakref.finalize(self, _remove_if_owner, self.folder, os.getpid())

    def record(self, path: Path, reason: str) -> None:
        if str(path) in self.seen:
            return
        self.seen.add(str(path))
        warnings.warn(f"skipping {path}: {reason}", stacklevel=2)
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"bad-{os.getpid()}.txt").open("a", encoding="utf-8") as file:
            file.write(f"{path}\t{reason}\n")

    def entries(self) -> list[tuple[str, str]]:
        if not self.folder.is_dir():
            return []
        lines = {line for log in self.folder.glob("bad-*.txt") for line in log.read_text().splitlines() if line}
        return sorted(tuple(line.split("\t", 1)) for line in lines)

    def remove(self) -> None:
        """Delete the temporary folder once the run has read its entries."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_cleanup")
        return state


def _remove_if_owner(folder: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(folder, ignore_errors=True)


def hash_order(files: list[Path], root: Path) -> list[Path]:
    """`files` ordered by a hash of their path relative to `root`: the order in which they go to validation."""
    return sorted(files, key=lambda path: hashlib.sha1(path.relative_to(root).as_posix().encode()).hexdigest())


def split_by_hash(files: list[Path], root: Path, val_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, val): the files whose relative path hashes lowest go to validation (at least one, and at
    least one file is left for training).

    Hashing the path instead of shuffling keeps an image on the same side when files are added or removed.
    """
    num_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    val = set(hash_order(files, root)[:num_val])
    return [f for f in files if f not in val], [f for f in files if f in val]


class FileCheck:
    """Reads files before training, each at most once, until each split has a readable image (a split
    without one would otherwise fail mid-run, or after training at the final validation). Unreadable
    files found on the way are dropped from the splits and reported like any skipped file, or, with
    `data.on_bad_file=error`, stop now with a ConfigError naming the file."""

    def __init__(self, on_bad_file: str, bad_files: BadFiles | None) -> None:
        self.on_bad_file = on_bad_file
        self.bad_files = bad_files
        self.reasons: dict[Path, str | None] = {}

    def reason(self, path: Path) -> str | None:
        """Why `path` cannot be read, or None if it can."""
        if path not in self.reasons:
            try:
                read_rgb(path)
                self.reasons[path] = None
            except OSError as error:
                self.reasons[path] = reason = one_line(error.__cause__ or error)
                if self.on_bad_file == "error":
                    raise ConfigError(f"data.on_bad_file=error: could not read image {path} ({reason}); fix or "
                                      "remove it, or set data.on_bad_file=skip to skip such files.") from None
        return self.reasons[path]

    def unreadable_head(self, split: list[Path]) -> list[Path]:
        """The files of `split` found unreadable before its first readable one (all of them if none is)."""
        unreadable = []
        for path in split:
            if self.reason(path) is None:
                break
            unreadable.append(path)
        return unreadable

    def unreadable(self) -> list[Path]:
        return [path for path, reason in self.reasons.items() if reason is not None]

    def report(self) -> None:
        """Warn about and list the unreadable files, once the data set is usable (a refused one gets only
        the one-sentence error)."""
        for path in self.unreadable():
            if self.bad_files is not None:
                self.bad_files.record(path, self.reasons[path])

    def fixed_split(self, files: list[Path], name: str, root: Path) -> list[Path]:
        """`files` (a split given by the data set's layout) without the unreadable files at its head."""
        unreadable = set(self.unreadable_head(files))
        if len(unreadable) == len(files):
            first = files[0]
            raise ConfigError(
                f"none of the {len(files)} images of the {name} split under data.root={root} could be read (e.g. "
                f"{first}: {self.reasons[first]}); replace the damaged files or set data.root to another copy."
            )
        return [path for path in files if path not in unreadable]


def layout_splits(list_files: Callable[[str], list[Path]], names: tuple[str, str], root: Path, crop_size: int,
                  train_samples: int, seed: int, random_flip: bool, augment: str, on_bad_file: str,
                  bad_files: BadFiles | None, cache_mb: float) -> tuple[FolderImages, FolderImages]:
    """(train, val) of a source whose layout fixes the split (ImageNet, CelebA): each split's files from
    `list_files(name)`, without the unreadable files at their head, served like data=folder's."""
    check = FileCheck(on_bad_file, bad_files)
    train, val = (check.fixed_split(list_files(name), name, root) for name in names)
    check.report()
    options = {"bad_files": bad_files, "on_bad_file": on_bad_file, "cache_mb": cache_mb}
    return (FolderImages(train, crop_size, True, seed, random_flip, train_samples, augment, **options),
            FolderImages(val, crop_size, False, seed, random_flip, **options))


class DecodedImages:
    """The images read most recently, decoded, up to `max_bytes` in all (the least recently used leave first)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.images: OrderedDict[int, Tensor] = OrderedDict()
        self.bytes = 0

    def get(self, key: int, read: Callable[[], Tensor]) -> Tensor:
        if key in self.images:
            self.images.move_to_end(key)
            return self.images[key]
        image = read()
        if image.nbytes <= self.max_bytes:
            self.images[key] = image
            self.bytes += image.nbytes
            while self.bytes > self.max_bytes:
                _, old = self.images.popitem(last=False)
                self.bytes -= old.nbytes
        return image


class FolderImages(CroppedImages):
    channels = 3

    def __init__(self, files: list[Path], crop_size: int, train: bool, seed: int, random_flip: bool,
                 min_length: int = 0, augment: str = "crop", bad_files: BadFiles | None = None,
                 on_bad_file: str = "skip", cache_mb: float = 0) -> None:
        super().__init__(len(files), crop_size, train, seed, random_flip, min_length, augment=augment)
        self.files = files
        self.bad_files = bad_files
        self.on_bad_file = on_bad_file
        self.warned_small: set[int] = set()
        self.decoded = DecodedImages(int(cache_mb * 2**20))

    def load_image(self, index: int) -> Tensor:
        """Image `index`, or with on_bad_file=skip the next readable one after it (deterministic)."""
        for offset in range(len(self.files)):
            candidate = (index + offset) % len(self.files)
            try:
                image = self.decoded.get(candidate, functools.partial(read_rgb, self.files[candidate]))
            except OSError as error:
                reason = one_line(error.__cause__ or error)
                if isinstance(error.__cause__, FileNotFoundError):
                    reason = "it no longer exists; if it was removed, run once with data.rescan=true"
                if self.on_bad_file == "error":
                    raise UnreadableImage(f"could not read image {self.files[candidate]} ({reason}); fix or remove "
                                          "it, or set data.on_bad_file=skip to skip such files") from None
                if self.bad_files is not None:
                    self.bad_files.record(self.files[candidate], reason)
                continue
            # Validation resizes every image to the crop (evaluation_view); only a training crop is upscaled.
            if self.train and min(image.shape[-2:]) < self.crop_size and candidate not in self.warned_small:
                self.warned_small.add(candidate)
                warnings.warn(f"{self.files[candidate]} is {image.shape[2]}x{image.shape[1]}, smaller than "
                              f"data.crop_size={self.crop_size}; it is resized up", stacklevel=2)
            return image
        raise UnreadableImage(f"none of the {len(self.files)} {'training' if self.train else 'validation'} images "
                              f"can be read any more (the first is {self.files[0]}); check data.root")


def build_folder(root: str | None, crop_size: int, train_samples: int, val_fraction: float, seed: int,
                 random_flip: bool, augment: str = "crop", on_bad_file: str = "skip", rescan: bool = False,
                 index: str | None = None, bad_files: BadFiles | None = None,
                 cache_mb: float = 0) -> tuple[FolderImages, FolderImages]:
    if root is None or str(root).strip() in ("", "???"):
        raise ConfigError("data.root is not set; set data.root to a directory of image files.")
    path = Path(root).expanduser()
    if not path.exists():
        raise ConfigError(f"data.root={root} does not exist; set data.root to a directory of image files.")
    if not path.is_dir():
        raise ConfigError(
            f"data.root={root} is not a directory; set data.root to a directory of image files."
        )
    files, seen = folder_index(path, rescan, Path(index).expanduser() if index else None)
    if not files:
        raise ConfigError(
            f"data.root={root} contains no image files ({seen} files seen, accepted extensions: "
            f"{', '.join(IMAGE_EXTENSIONS)}); set data.root to a directory of image files."
        )
    if len(files) < 2:
        raise ConfigError(
            f"data.root={root} contains only 1 image file but at least 2 are needed (one is held out for "
            f"validation); add images to data.root."
        )
    check = FileCheck(on_bad_file, bad_files)
    while True:  # each pass drops what it found unreadable, until both splits start with a readable image
        usable = [f for f in files if check.reasons.get(f) is None]
        if len(usable) < 2:
            break
        train, val = split_by_hash(usable, path, val_fraction)
        if not check.unreadable_head(val) and not check.unreadable_head(train):
            break
    if len(usable) < 2:
        first = check.unreadable()[0]
        found = ("only 1 of the {} image files under data.root={} could be read, but at least 2 are needed (one is "
                 "held out for validation)" if any(check.reason(f) is None for f in usable)
                 else "none of the {} image files under data.root={} could be read")
        raise ConfigError(
            f"{found.format(len(files), root)} (e.g. {first}: {check.reasons[first]}); replace the damaged files "
            "or set data.root to a folder of readable images."
        )
    check.report()
    options = {"bad_files": bad_files, "on_bad_file": on_bad_file, "cache_mb": cache_mb}
    return (FolderImages(train, crop_size, True, seed, random_flip, min_length=train_samples, augment=augment,
                         **options),
            FolderImages(val, crop_size, False, seed, random_flip, **options))
