"""The captions of an image folder, in either of the two usual layouts:

- ``metadata.jsonl`` at the root (Hugging Face ``imagefolder``): one JSON object a line, with
  ``file_name`` (the image's path relative to the root) and ``text`` (a caption, or a list of
  captions). Several lines may name one file: its captions add up. Other keys are ignored.
- a ``.txt`` file beside each image (``cat.png`` and ``cat.txt``): each non-empty line of it is a
  caption.

An image with several captions gets one of them drawn each time it is read
(:class:`flowdiff.data.captions.CaptionTable`). Captioned folders condition on text: class
folders, if any, are then only where the images live.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flowdiff.data.image_files import ImageList
from flowdiff.utils import UsageError

METADATA = "metadata.jsonl"
LAYOUTS = ("auto", "metadata", "txt", "none")


@dataclass
class CaptionedImages:
    """The images that have captions, and ``captions[i]`` (one or more) of ``files.paths[i]``;
    ``skipped``: how many images were left out for having none."""

    files: ImageList
    captions: list[list[str]]
    skipped: int = 0


def _beside(path: Path) -> Path:
    return path.with_suffix(".txt")


def find_layout(files: ImageList, layout: str) -> str:
    """The caption layout of the folder: ``metadata``, ``txt`` or ``none``; ``auto`` finds it (a
    UsageError when it finds both)."""
    if layout not in LAYOUTS:
        raise UsageError(f"data.captions {layout!r}: expected one of {list(LAYOUTS)}")
    root = files.root
    if layout == "metadata" and not (root / METADATA).is_file():
        raise UsageError(
            f"data.root {str(root)!r} has no {METADATA} (file_name and text on each line); for "
            "a .txt caption beside each image pass --data.init_args.captions txt"
        )
    if layout != "auto":
        return layout
    metadata = (root / METADATA).is_file()
    txt = next((_beside(p) for p in files.paths if _beside(p).is_file()), None)
    if metadata and txt is not None:
        raise UsageError(
            f"data.root {str(root)!r} holds both {METADATA} and .txt captions beside its images "
            f"({txt.relative_to(root).as_posix()}, ...); pass --data.init_args.captions metadata "
            "or txt"
        )
    return "metadata" if metadata else ("txt" if txt is not None else "none")


def _caption_list(text, where: str) -> list[str]:
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise UsageError(
            f"{where}: text must be a caption or a non-empty list of captions, got {text!r:.60}"
        )
    if not all(t.strip() for t in texts):
        raise UsageError(f"{where}: an empty caption (the empty string is the null caption)")
    return texts


def read_metadata(files: ImageList) -> dict[str, list[str]]:
    """The captions of ``metadata.jsonl`` by relative path; a UsageError naming the line of
    anything that is not an object with ``file_name`` and ``text``, or that names no image of
    the folder."""
    path = files.root / METADATA
    known = {p.relative_to(files.root).as_posix() for p in files.paths}
    captions: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {str(path)!r}: {err}") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where}: not JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise UsageError(f"{where}: expected an object with file_name and text, got {found}")
        name = row["file_name"]
        if not isinstance(name, str):
            raise UsageError(f"{where}: file_name must be a path, got {name!r}")
        name = Path(name).as_posix().removeprefix("./")
        if name not in known:
            raise UsageError(
                f"{where}: a caption for {name!r}, which is not an image under data.root"
            )
        captions.setdefault(name, []).extend(_caption_list(row["text"], where))
    if not captions:
        raise UsageError(f"{path} holds no captions (one JSON object a line: file_name, text)")
    return captions


def read_txt(files: ImageList) -> dict[str, list[str]]:
    """The captions of the ``.txt`` files beside the images, by relative path (each non-empty
    line a caption)."""
    captions = {}
    for path in files.paths:
        txt = _beside(path)
        if not txt.is_file():
            continue
        try:
            lines = [line.strip() for line in txt.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read the caption file {str(txt)!r}: {err}") from err
        if not any(lines):
            raise UsageError(f"{txt}: an empty caption file (the empty string is the null caption)")
        captions[path.relative_to(files.root).as_posix()] = [line for line in lines if line]
    return captions


def read_captions(files: ImageList, layout: str, skip_uncaptioned: bool) -> CaptionedImages | None:
    """The folder's captioned images in ``layout`` (:data:`LAYOUTS`), or None when it has no
    captions; images without a caption are a UsageError, or with ``skip_uncaptioned`` left out
    (and counted)."""
    layout = find_layout(files, layout)
    if layout == "none":
        return None
    by_name = read_metadata(files) if layout == "metadata" else read_txt(files)
    names = [p.relative_to(files.root).as_posix() for p in files.paths]
    missing = [name for name in names if name not in by_name]
    if missing and not skip_uncaptioned:
        where = METADATA if layout == "metadata" else "a .txt beside it"
        raise UsageError(
            f"{len(missing)} of {len(names)} images under data.root have no caption in {where} "
            f"(first: {missing[0]}); caption them or pass --data.init_args.skip_uncaptioned true"
        )
    keep = [i for i, name in enumerate(names) if name in by_name]
    if not keep:
        raise UsageError(f"data.root {str(files.root)!r}: no image has a caption")
    kept = ImageList(
        files.root, [files.paths[i] for i in keep], [0] * len(keep), None
    )  # captions, not class folders, are the condition
    return CaptionedImages(kept, [by_name[names[i]] for i in keep], len(missing))
