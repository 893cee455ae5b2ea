"""Dataset statistics: counts per split, depth range and valid fraction, mean colour (numpy only)."""

from __future__ import annotations

import pathlib

import numpy as np

from mdekd.constants import valid_depth
from mdekd.data.pairs import list_pairs, read_depth_png, read_rgb, resolve_layout


def describe_dataset(root, dataset: str = "mai2021", splits=("train", "validation"), *,
                     max_pairs: int | None = 256, depth_scale: float | None = None, **layout_options) -> dict:
    """Per-split statistics of a dataset; splits whose folder is missing are skipped.

    Depth figures cover valid pixels (MIN_DEPTH < d <= MAX_DEPTH) of up to ``max_pairs`` pairs
    taken evenly through the split (None = all). Returns
    ``{split: {"count", "sampled", "sizes" [(H, W)], "depth_min", "depth_median", "depth_max"
    (metres), "valid_fraction", "image_mean" [R, G, B] in [0, 1]}}``.
    """
    scale = resolve_layout(dataset, **layout_options).depth_scale if depth_scale is None else depth_scale
    if scale is None:
        raise ValueError(f"dataset {dataset!r} needs depth_scale= (metres per stored depth unit)")
    description = {}
    for split in splits:
        if not (pathlib.Path(root) / split).is_dir():
            continue
        pairs = all_pairs = list_pairs(root, split, dataset, **layout_options)
        if max_pairs is not None and len(all_pairs) > max_pairs:
            pairs = [all_pairs[i] for i in np.linspace(0, len(all_pairs) - 1, max_pairs).round().astype(int)]
        valid_depths, colour_sums, pixels, sizes = [], np.zeros(3), 0, set()
        for rgb_path, depth_path in pairs:
            image = read_rgb(rgb_path)
            depth = read_depth_png(depth_path, scale)[..., 0]
            valid_depths.append(depth[valid_depth(depth)])
            colour_sums += image.reshape(-1, 3).sum(axis=0, dtype=np.float64)
            pixels += depth.size
            sizes.add(depth.shape)
        valid = np.concatenate(valid_depths)
        description[split] = {
            "count": len(all_pairs),
            "sampled": len(pairs),
            "sizes": sorted(sizes),
            "depth_min": float(valid.min()) if valid.size else float("nan"),
            "depth_median": float(np.median(valid)) if valid.size else float("nan"),
            "depth_max": float(valid.max()) if valid.size else float("nan"),
            "valid_fraction": valid.size / pixels,
            "image_mean": (colour_sums / pixels).tolist(),
        }
    return description


def format_description(description: dict) -> str:
    """One line a split, e.g. ``train: 800 pairs 256x320, depth 0.61-40.00 m (median 6.93), ...``."""
    lines = []
    for split, s in description.items():
        sizes = ", ".join(f"{h}x{w}" for h, w in s["sizes"])
        sampled = "" if s["sampled"] == s["count"] else f" (statistics from {s['sampled']})"
        mean = ", ".join(f"{c:.3f}" for c in s["image_mean"])
        lines.append(f"{split}: {s['count']} pairs {sizes}{sampled}, depth {s['depth_min']:.2f}-"
                     f"{s['depth_max']:.2f} m (median {s['depth_median']:.2f}), "
                     f"valid {100 * s['valid_fraction']:.1f} %,"
                     f" image mean RGB ({mean})")
    return "\n".join(lines)
