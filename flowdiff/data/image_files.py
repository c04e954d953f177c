"""A folder of image files: the list of files, and its uint8 cache decoded once.

- **Layout** (:func:`scan`): torchvision's ``ImageFolder`` (one sub-folder per class, searched
  recursively; labels ``0..K-1`` in the sorted order of the folder names) or a flat folder of
  images (no labels). Files whose extension Pillow knows count as images; other files and hidden
  entries (``.name``) are ignored.
- **Decoding** (:func:`decode`): converted to grey (``L``) or RGB, the short side resized to
  ``image_size`` (halved with a box filter while it is at least twice as large, then bicubic, as
  in guided-diffusion) and center-cropped to a square.
- **Cache** (:func:`build_cache`): all images decoded once, in parallel, into one memory-mappable
  ``images.npy`` (N, C, S, S) uint8 beside ``labels.npy`` and ``rows.npy`` (the images kept), in a
  folder named by a hash of the file list (paths, sizes, modification times) and the settings:
  change a file or a setting and another cache is built; the same data and settings reuse it. The
  folder appears whole (built under a temporary name, then renamed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowdiff.utils import UsageError

CACHE_VERSION = 1
CHUNK = 256  # files a decoding task


def image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


@dataclass
class ImageList:
    """The images of a folder: paths, labels (``0..K-1``, zeros when unlabelled), class names."""

    root: Path
    paths: list[Path]
    labels: list[int]
    class_names: list[str] | None

    def key(self, settings: dict) -> str:
        """A hash of the file list (relative paths, sizes, modification times) and settings."""
        h = hashlib.sha1(json.dumps({"v": CACHE_VERSION, **settings}, sort_keys=True).encode())
        for path, label in zip(self.paths, self.labels, strict=True):
            stat = path.stat()
            rel = path.relative_to(self.root).as_posix()
            h.update(f"{rel}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return h.hexdigest()


def _visible(entries) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _images_under(folder: str, extensions: set[str]) -> list[Path]:
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            Path(parent, f)
            for f in sorted(files)
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions
        ]
    return found


def scan(root: str | os.PathLike) -> ImageList:
    """The images under ``root`` in either layout; a UsageError for a folder that is missing,
    empty, mixes the layouts, or has a class folder without images."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"data.root {str(root)!r}: no such folder")
    if not root.is_dir():
        raise UsageError(f"data.root {str(root)!r} is not a folder")
    extensions = image_extensions()
    with os.scandir(root) as it:
        entries = _visible(it)
    folders = [e for e in entries if e.is_dir()]
    files = [
        Path(e.path)
        for e in entries
        if e.is_file() and os.path.splitext(e.name)[1].lower() in extensions
    ]
    if folders and files:
        raise UsageError(
            f"data.root {str(root)!r} holds both images ({files[0].name}, ...) and sub-folders "
            f"({folders[0].name}, ...): put every image in a class folder (labelled) or none "
            "(unlabelled)"
        )
    if files:
        return ImageList(root, files, [0] * len(files), None)
    if not folders:
        raise UsageError(f"data.root {str(root)!r} holds no images (nor class folders)")
    paths, labels = [], []
    for label, folder in enumerate(folders):
        found = _images_under(folder.path, extensions)
        if not found:
            raise UsageError(
                f"data.root {str(root)!r}: class folder {folder.name!r} holds no images"
            )
        paths += found
        labels += [label] * len(found)
    return ImageList(root, paths, labels, [f.name for f in folders])


def decode(path: str | os.PathLike, image_size: int, channels: int) -> np.ndarray:
    """One image as uint8 (C, S, S): converted, short side resized to S, center-cropped."""
    from PIL import Image

    with Image.open(path) as image:
        image.draft("L" if channels == 1 else "RGB", (image_size, image_size))  # JPEG: decode small
        image = image.convert("L" if channels == 1 else "RGB")
        while min(image.size) >= 2 * image_size:
            image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
        scale = image_size / min(image.size)
        size = tuple(max(image_size, round(s * scale)) for s in image.size)
        if size != image.size:
            image = image.resize(size, resample=Image.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
    top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
    array = array[top : top + image_size, left : left + image_size]
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _decode_chunk(out: str, start: int, paths: list[str], image_size: int, channels: int):
    """Decode ``paths`` into rows ``start..`` of the memory-mapped ``out``; the failures."""
    images = np.load(out, mmap_mode="r+")
    failed = []
    for i, path in enumerate(paths):
        try:
            images[start + i] = decode(path, image_size, channels)
        except Exception as err:  # Pillow raises many kinds; each is a file it cannot read
            failed.append((start + i, f"{type(err).__name__}: {err}".splitlines()[0]))
    images.flush()
    return failed


@dataclass
class ImageCache:
    """A built cache: uint8 images (N, C, S, S) memory-mapped, labels (N,), rows kept."""

    folder: Path
    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray
    skipped: list[str]


def open_cache(folder: Path) -> ImageCache:
    meta = json.loads((folder / "meta.json").read_text())
    return ImageCache(
        folder,
        np.load(folder / "images.npy", mmap_mode="c"),  # copy-on-write: writable, never written
        np.load(folder / "labels.npy"),
        np.load(folder / "rows.npy"),
        meta["skipped"],
    )


def build_cache(
    files: ImageList,
    folder: Path,
    image_size: int,
    channels: int,
    workers: int | None = None,
    skip_unreadable: bool = False,
) -> ImageCache:
    """The cache in ``folder``, decoded now if it is not there (in ``workers`` processes, with a
    progress bar). A file Pillow cannot read is a UsageError naming it, or, with
    ``skip_unreadable``, left out and counted."""
    if (folder / "meta.json").is_file():
        return open_cache(folder)
    from tqdm import tqdm

    n = len(files.paths)
    made = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{folder}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as err:
        raise UsageError(f"cannot write the image cache {str(folder.parent)!r}: {err}") from err
    try:
        shape = (n, channels, image_size, image_size)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, shape)
        del images  # the workers write into the file
        workers = max(1, min(workers or os.cpu_count() or 1, -(-n // CHUNK)))
        print(
            f"flowdiff: decoding {n} images of {files.root} at {image_size} px into {folder} "
            f"(once; {workers} processes)",
            flush=True,
        )
        start, failed = time.perf_counter(), []
        paths = [str(p) for p in files.paths]
        bar = tqdm(total=n, unit="img", desc="decoding", disable=None, file=sys.stderr)
        with ProcessPoolExecutor(workers) as pool:
            tasks = {
                pool.submit(_decode_chunk, str(tmp / "images.npy"), i, paths[i : i + CHUNK],
                            image_size, channels): i
                for i in range(0, n, CHUNK)
            }  # fmt: skip
            for task in as_completed(tasks):
                failed += task.result()
                bar.update(len(paths[tasks[task] : tasks[task] + CHUNK]))
                if failed and not skip_unreadable:
                    for other in tasks:
                        other.cancel()
                    break
        bar.close()
        if failed and not skip_unreadable:
            row, reason = min(failed)
            raise UsageError(
                f"cannot read image {paths[row]!r} ({reason}); remove it, or pass "
                "--data.init_args.skip_unreadable true to leave such files out"
            )
        bad = {row for row, _ in failed}
        rows = np.array([i for i in range(n) if i not in bad], dtype=np.int64)
        if len(rows) == 0:
            raise UsageError(f"data.root {str(files.root)!r}: no image could be read")
        np.save(tmp / "labels.npy", np.asarray(files.labels, dtype=np.int64))
        np.save(tmp / "rows.npy", rows)
        skipped = [paths[row] for row in sorted(bad)]
        meta = {"root": str(files.root), "count": n, "skipped": skipped,
                "class_names": files.class_names, "shape": list(shape)}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(folder)
        except OSError:  # another process built it meanwhile: use theirs
            if not (folder / "meta.json").is_file():
                raise
        seconds = time.perf_counter() - start
        note = f"; {len(skipped)} unreadable file(s) left out" if skipped else ""
        print(f"flowdiff: decoded {n} images in {seconds:.1f} s{note}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in made:  # folders made for a cache that failed go too: nothing is left
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return open_cache(folder)
