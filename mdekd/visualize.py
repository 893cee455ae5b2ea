"""Depth pictures: a perceptual colour map and RGB | truth | prediction (| error) panels, numpy only."""

import numpy as np

# Anchor colours of Google's Turbo colour map (Mikhailov 2019), sampled every 1/8; linear in between.
_TURBO_ANCHORS = np.array([
    [48, 18, 59], [70, 107, 227], [40, 187, 236], [50, 241, 153], [164, 252, 60],
    [237, 208, 58], [250, 129, 36], [210, 49, 7], [122, 4, 3],
], dtype=np.float32)


def colorize_depth(depth, vmin=None, vmax=None):
    """(H, W) metres → (H, W, 3) uint8 Turbo colours; near = blue, far = red, 0 (invalid) = black.

    ``vmin``/``vmax`` default to the range of the valid pixels, in inverse depth so near detail shows.
    """
    depth = np.asarray(depth, dtype=np.float32)
    valid = depth > 0
    if not valid.any():
        return np.zeros(depth.shape + (3,), np.uint8)
    inverse = np.where(valid, 1.0 / np.maximum(depth, 1e-6), 0.0)
    lo = 1.0 / vmax if vmax else inverse[valid].min()
    hi = 1.0 / vmin if vmin else inverse[valid].max()
    # far (small inverse) → 1 → red end; near → 0 → blue end.
    t = 1.0 - np.clip((inverse - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    position = t * (len(_TURBO_ANCHORS) - 1)
    index = np.minimum(position.astype(np.int32), len(_TURBO_ANCHORS) - 2)
    fraction = (position - index)[..., None]
    colours = _TURBO_ANCHORS[index] * (1 - fraction) + _TURBO_ANCHORS[index + 1] * fraction
    colours[~valid] = 0
    return colours.round().astype(np.uint8)


def colorize_error(error, vmax=None):
    """(H, W) absolute error (metres, NaN = no truth) → uint8 heat map, black where no truth."""
    error = np.asarray(error, dtype=np.float32)
    known = np.isfinite(error)
    scale = vmax or (np.percentile(error[known], 99) if known.any() else 1.0) or 1.0
    level = np.clip(np.where(known, error, 0) / scale, 0, 1)
    heat = np.stack([255 * np.clip(2 * level, 0, 1), 255 * np.clip(2 * level - 1, 0, 1),
                     np.zeros_like(level)], axis=-1)
    heat[~known] = 0
    return heat.astype(np.uint8)


def depth_panel(image, truth, prediction, with_error=False):
    """Side-by-side uint8 panel: RGB | truth | prediction (| |prediction − truth|).

    ``image`` (H, W, 3) float in [0, 1] or uint8; ``truth``, ``prediction`` (H, W) metres, truth 0 =
    invalid. Truth and prediction share one colour range (that of the valid truth when present).
    """
    rgb = np.asarray(image)
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    truth = np.asarray(truth, np.float32)
    prediction = np.asarray(prediction, np.float32)
    valid = truth > 0
    reference = truth[valid] if valid.any() else prediction[prediction > 0]
    vmin, vmax = (float(reference.min()), float(reference.max())) if reference.size else (None, None)
    tiles = [rgb, colorize_depth(truth, vmin, vmax), colorize_depth(prediction, vmin, vmax)]
    if with_error:
        tiles.append(colorize_error(np.where(valid, np.abs(prediction - truth), np.nan)))
    return np.concatenate(tiles, axis=1)
