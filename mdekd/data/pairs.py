"""Dataset layouts as data, pairing of RGB and depth files, and numpy readers.

One pairing rule serves every layout (design.md §3). A split lives in ``<root>/<split>``; its RGB files
are searched recursively under ``rgb_dir`` and its depth files under ``depth_dir`` (both relative to
the split folder, ``""`` = the split folder itself, an absolute path is used as is). A file's
**pairing key** is its path relative to that folder with the layout's prefix stripped from the file
name and the extension dropped; an RGB file and a depth file pair when their keys are equal:

- ``mai2021``: ``train/rgb/0001.png`` + ``train/depth/0001.png``, depth mm / 1000 (design.md §3);
- ``synthetic``: the same layout, what ``mdekd.data.synthetic`` writes;
- ``kitti``: ``train/rgb/<drive>/image_02/0000000005.png`` + ``train/depth/<drive>/image_02/
  0000000005.png``, depth value / 256;
- ``nyu`` (BTS): ``sync/<scene>/rgb_00000.jpg`` + ``sync/<scene>/sync_depth_00000.png``, mm / 1000;
- ``folder``: ``<split>/rgb/<any>.{png,jpg,jpeg}`` + ``<split>/depth/<any>.png``, value ×
  ``depth_scale`` (metres per stored unit, required).

(key: ``0001``, ``<drive>/image_02/0000000005``, ``<scene>/00000``.) The official KITTI tree keeps
RGB and annotated depth in different hierarchies; link them into ``rgb/`` and ``depth/`` with the
same relative paths, or pass ``rgb_dir=``/``depth_dir=``; its annotations skip the first and last
frames of each drive, so pass ``allow_unpaired=True`` to drop RGB frames without depth. NYU uses the BTS layout, where RGB and
depth sit in one folder and differ by prefix; its splits are folder names such as ``sync`` or
``official_splits/test``. Every field of a layout can be overridden by keyword (``layout_options``).

Depth files must be single-channel 16-bit PNGs; an 8-bit or colour PNG is rejected because its
values cannot be metric depth at the stated scale (and TF would silently decode it differently).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

Pair = tuple[str, str]

_SHOW = 5  # how many offending files an error message names before "... and N more"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # the 8-bit RGB files ``read_rgb`` reads


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a split's RGB and depth files live and how stored depth maps to metres."""

    rgb_dir: str  # relative to <root>/<split>; "" = the split folder itself
    depth_dir: str
    depth_scale: float | None  # metres per stored unit; None = the caller must give it
    rgb_prefix: str = ""
    depth_prefix: str = ""
    rgb_extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    depth_extensions: tuple[str, ...] = (".png",)


_MAI2021 = Layout("rgb", "depth", depth_scale=1e-3)  # design.md §3: uint16 PNG in millimetres
LAYOUTS: dict[str, Layout] = {
    "mai2021": _MAI2021,
    "synthetic": _MAI2021,  # mdekd.data.synthetic writes the MAI2021 layout
    "kitti": Layout("rgb", "depth", depth_scale=1 / 256, rgb_extensions=(".png",)),  # design.md §3: v / 256
    "nyu": Layout("", "", depth_scale=1e-3, rgb_prefix="rgb_", depth_prefix="sync_depth_"),  # BTS, mm
    "folder": Layout("rgb", "depth", depth_scale=None),  # generic: depth_scale= required
}

# PIL modes of a single-channel 16-bit PNG (Pillow >= 10 reads them as "I;16"; older ones as "I").
DEPTH_PNG_MODES = ("I;16", "I;16B", "I;16L", "I")
RGB_MODES = ("RGB", "RGBA", "L", "LA", "P")  # all decode to 3 channels in PIL and in tf.io
_MODE_WORDS = {"L": "8-bit grayscale", "LA": "8-bit grayscale + alpha", "P": "8-bit palette",
               "RGB": "8-bit RGB", "RGBA": "8-bit RGBA", "1": "1-bit", "F": "32-bit float"}


def resolve_layout(dataset: str, **layout_options) -> Layout:
    """The layout named ``dataset`` with any field overridden by ``layout_options``."""
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {', '.join(sorted(LAYOUTS))}")
    fields = {f.name for f in dataclasses.fields(Layout)}
    unknown = sorted(set(layout_options) - fields)
    if unknown:
        raise TypeError(f"unknown layout option(s) {', '.join(unknown)} for dataset {dataset!r}; "
                        f"known options: {', '.join(sorted(fields))}")
    for key in ("rgb_extensions", "depth_extensions"):
        if isinstance(layout_options.get(key), str):
            layout_options[key] = (layout_options[key],)
    layout = dataclasses.replace(LAYOUTS[dataset], **layout_options)
    if layout.rgb_dir == layout.depth_dir and layout.rgb_prefix == layout.depth_prefix:
        raise ValueError(f"dataset {dataset!r}: RGB and depth share the folder {layout.rgb_dir!r}, so "
                         f"rgb_prefix and depth_prefix must differ (both are {layout.rgb_prefix!r})")
    return layout


def list_pairs(root, split: str = "train", dataset: str = "mai2021", *, allow_unpaired: bool = False,
               **layout_options) -> list[Pair]:
    """Sorted ``(rgb_path, depth_path)`` pairs of one split; see the module docstring for layouts.

    Raises FileNotFoundError for a missing root or split folder and ValueError for an unknown
    dataset, unpaired files (unless ``allow_unpaired``, which drops them) and an empty split.
    """
    layout = resolve_layout(dataset, **layout_options)
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root} (dataset {dataset!r})")
    split_dir = root / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise FileNotFoundError(f"split folder not found: {split_dir} (folders in {root}: "
                                f"{', '.join(present) or 'none'})")
    rgb_dir, depth_dir = split_dir / layout.rgb_dir, split_dir / layout.depth_dir
    for kind, folder in (("RGB", rgb_dir), ("depth", depth_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{kind} folder not found: {folder} (dataset {dataset!r})")

    shared = rgb_dir.resolve() == depth_dir.resolve()
    rgb = _keyed_files(rgb_dir, layout.rgb_prefix, layout.rgb_extensions,
                       other_prefix=layout.depth_prefix if shared else None)
    depth = _keyed_files(depth_dir, layout.depth_prefix, layout.depth_extensions,
                         other_prefix=layout.rgb_prefix if shared else None)
    rgb_only = sorted(rgb.keys() - depth.keys())
    depth_only = sorted(depth.keys() - rgb.keys())
    if not allow_unpaired:
        if rgb_only:
            raise ValueError(f"{len(rgb_only)} RGB file(s) have no depth file in {depth_dir} "
                             f"(expected {layout.depth_prefix}<name>{_braced(layout.depth_extensions)}): "
                             f"{_first_few(str(rgb[k]) for k in rgb_only)}")
        if depth_only:
            raise ValueError(f"{len(depth_only)} depth file(s) have no RGB file in {rgb_dir} "
                             f"(expected {layout.rgb_prefix}<name>{_braced(layout.rgb_extensions)}): "
                             f"{_first_few(str(depth[k]) for k in depth_only)}")
    pairs = [(str(rgb[k]), str(depth[k])) for k in sorted(rgb.keys() & depth.keys())]
    if not pairs:
        raise ValueError(f"no RGB/depth pairs found in {split_dir} (dataset {dataset!r}: {len(rgb)} RGB "
                         f"file(s) {layout.rgb_prefix}*{_braced(layout.rgb_extensions)} under {rgb_dir}, "
                         f"{len(depth)} depth file(s) {layout.depth_prefix}*"
                         f"{_braced(layout.depth_extensions)} under {depth_dir})")
    return pairs


def list_images(root, flag: str = "--unlabeled_dir", recursive: bool = True) -> list[str]:
    """Sorted paths of the RGB images (``IMAGE_EXTENSIONS``) in the folder ``root`` (searched
    recursively unless ``recursive=False``), or ``[root]`` for a single image file.

    Raises FileNotFoundError for a missing path and ValueError for a folder holding no image, both
    naming ``flag``.
    """
    path = pathlib.Path(root)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"{flag}: no such file or folder: {path}")
    candidates = path.rglob("*") if recursive else path.iterdir()
    images = sorted(str(p) for p in candidates
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        where = "searched recursively" if recursive else "directly in the folder"
        raise ValueError(f"{flag}: {path} holds no image (expected {'/'.join(IMAGE_EXTENSIONS)} files, "
                         f"{where})")
    return images


def depth_file_for(image_path, depth_dir, dataset: str = "mai2021", flag: str = "--depth_dir",
                   **layout_options) -> str:
    """The depth file in ``depth_dir`` that pairs with ``image_path`` by the layout's rule: the
    image's file name without the RGB prefix and extension, with the depth prefix and a depth
    extension. FileNotFoundError naming ``flag`` and the expected name if there is none."""
    layout = resolve_layout(dataset, **layout_options)
    stem = pathlib.Path(image_path).stem
    key = stem[len(layout.rgb_prefix):] if stem.startswith(layout.rgb_prefix) else stem
    for extension in layout.depth_extensions:
        candidate = pathlib.Path(depth_dir) / f"{layout.depth_prefix}{key}{extension}"
        if candidate.is_file():
            return str(candidate)
    expected = pathlib.Path(depth_dir) / f"{layout.depth_prefix}{key}{_braced(layout.depth_extensions)}"
    raise FileNotFoundError(f"{flag}: no depth file for {image_path} (expected {expected})")


def _keyed_files(folder: pathlib.Path, prefix: str, extensions: Sequence[str],
                 other_prefix: str | None) -> dict[str, pathlib.Path]:
    """{pairing key: path} of the files under ``folder`` that match ``prefix`` and ``extensions``.

    ``other_prefix`` is the other kind's prefix when both kinds share the folder: a file that
    matches it with a longer prefix belongs to the other kind (``sync_depth_`` vs ``""``).
    """
    extensions = tuple(e.lower() for e in extensions)
    found: dict[str, pathlib.Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        relative_dir = pathlib.Path(dirpath).relative_to(folder)
        for name in sorted(filenames):
            stem, extension = os.path.splitext(name)
            if name.startswith(".") or extension.lower() not in extensions or not stem.startswith(prefix):
                continue
            if other_prefix is not None and len(other_prefix) > len(prefix) and stem.startswith(other_prefix):
                continue
            key = (relative_dir / stem[len(prefix):]).as_posix()
            path = pathlib.Path(dirpath) / name
            if key in found:
                raise ValueError(f"two files share the pairing key {key!r}: {found[key]} and {path}")
            found[key] = path
    return found


def _braced(extensions: Sequence[str]) -> str:
    return extensions[0] if len(extensions) == 1 else "{" + ",".join(extensions) + "}"


def _first_few(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_SHOW])
    return shown + (f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def _describe_mode(mode: str) -> str:
    return f"mode {mode!r} ({_MODE_WORDS[mode]})" if mode in _MODE_WORDS else f"mode {mode!r}"


def _open(path) -> Image.Image:
    """PIL image with its header read (pixels not decoded); errors name the file."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"cannot read image file {path}: {error}") from None


def _check_depth_header(image: Image.Image, path) -> None:
    if image.format != "PNG" or image.mode not in DEPTH_PNG_MODES:
        raise ValueError(f"depth file {path}: expected a single-channel 16-bit PNG (uint16, PIL mode "
                         f"'I;16'), found a {image.format} image of {_describe_mode(image.mode)}")


def _check_rgb_header(image: Image.Image, path) -> None:
    if image.mode not in RGB_MODES:
        raise ValueError(f"RGB file {path}: expected an 8-bit RGB, RGBA, grayscale or palette image, "
                         f"found a {image.format} image of {_describe_mode(image.mode)}")


def _pixels(image: Image.Image, path) -> np.ndarray:
    """Decoded pixels (RGB-like modes converted to RGB); corrupt pixel data names the file."""
    try:
        return np.asarray(image.convert("RGB") if image.mode in RGB_MODES[1:] else image)
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt pixel data
        raise ValueError(f"cannot decode image file {path}: {error}") from None


def read_depth_png(path, depth_scale: float) -> np.ndarray:
    """(H, W, 1) float32 depth in metres from a uint16 PNG; stored 0 stays 0 (invalid).

    Metres = value / (1 / depth_scale), so millimetres (depth_scale 1e-3) become exactly the
    correctly rounded ``value / 1000`` — the same operation the tf.data pipeline performs.
    """
    with _open(path) as image:
        _check_depth_header(image, path)
        values = _pixels(image, path).astype(np.float32)
    return (values / np.float32(1.0 / depth_scale))[..., None]


def read_rgb(path) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 1] from an 8-bit PNG or JPEG (grayscale/palette expanded)."""
    with _open(path) as image:
        _check_rgb_header(image, path)
        return _pixels(image, path).astype(np.float32) / np.float32(255.0)


def check_pairs(pairs: Sequence[Pair], *, full: bool = False) -> list[tuple[int, int]]:
    """Check every pair from file headers; return each pair's (H, W).

    Reads only PNG/JPEG headers (measured ~60 µs a pair on a busy 2-core VM, so ~0.6 s for 10k
    pairs, affordable at every start): format and mode (depth must be a uint16 single-channel
    PNG, RGB 8-bit colour/gray) and equal image/depth size. ``full=True`` also verifies every
    PNG's chunk checksums (reads whole files: ~0.1 ms a 256×320 pair from the page cache, a full
    read of the dataset from a cold disk) and so catches truncated or corrupted pixel data, which
    TensorFlow would otherwise report at decode time without the file name.
    Raises ValueError naming the first few bad files and the count.
    """
    problems: list[str] = []
    sizes: list[tuple[int, int]] = []
    for rgb_path, depth_path in pairs:
        try:
            with _open(rgb_path) as rgb:
                _check_rgb_header(rgb, rgb_path)
                rgb_size = rgb.size
                if full:
                    _verify(rgb, rgb_path)
            with _open(depth_path) as depth:
                _check_depth_header(depth, depth_path)
                if depth.size != rgb_size:
                    raise ValueError(f"size mismatch: RGB {rgb_path} is {rgb_size[0]}x{rgb_size[1]} (WxH) but "
                                     f"depth {depth_path} is {depth.size[0]}x{depth.size[1]}")
                if full:
                    _verify(depth, depth_path)
        except (ValueError, FileNotFoundError) as error:
            problems.append(str(error))
            continue
        sizes.append((rgb_size[1], rgb_size[0]))
    if problems:
        detail = "\n  ".join(problems[:_SHOW])
        more = f"\n  ... and {len(problems) - _SHOW} more" if len(problems) > _SHOW else ""
        raise ValueError(f"{len(problems)} of {len(pairs)} RGB/depth pair(s) are unusable:\n  {detail}{more}")
    return sizes


def _verify(image: Image.Image, path) -> None:
    try:
        image.verify()
    except Exception as error:  # PIL raises SyntaxError, OSError, struct.error ... for corrupt files
        raise ValueError(f"corrupt image file {path}: {error}") from None
