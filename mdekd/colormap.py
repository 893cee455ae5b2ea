"""Colour maps for depth images, in numpy (no plotting library needed).

``turbo`` is the polynomial approximation of Google's Turbo colour map (Mikhailov 2019, "Turbo, an
improved rainbow colormap for visualization"; coefficients from the author's published GLSL
approximation, Apache-2.0). ``colorize_depth`` maps near to red and far to blue; invalid pixels
(depth <= 0 or not finite) are black.
"""

import numpy as np

from mdekd.constants import valid_depth

# Turbo polynomial approximation: c(x) = v4 · (1, x, x², x³) + v2 · (x⁴, x⁵), per channel.
_TURBO_V4 = np.array(
    [
        [0.13572138, 4.61539260, -42.66032258, 132.13108234],  # red
        [0.09140261, 2.19418839, 4.84296658, -14.18503333],  # green
        [0.10667330, 12.64194608, -60.58204836, 110.36276771],  # blue
    ]
)
_TURBO_V2 = np.array(
    [
        [-152.94239396, 59.28637943],
        [4.27729857, 2.82956604],
        [-89.90310912, 27.34824973],
    ]
)


def turbo(values):
    """Turbo colours of ``values`` in [0, 1] (clipped): (...,) -> (..., 3) uint8 RGB."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)[..., None]
    powers4 = np.concatenate([np.ones_like(x), x, x**2, x**3], axis=-1)  # (..., 4)
    powers2 = np.concatenate([x**4, x**5], axis=-1)  # (..., 2)
    rgb = powers4 @ _TURBO_V4.T + powers2 @ _TURBO_V2.T
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def depth_range(depth):
    """(low, high) metres spanning the valid pixels of ``depth`` (2nd and 98th percentiles).

    Percentiles, not min/max, so one stray pixel does not wash out the picture. (1, 2) when no
    pixel is valid.
    """
    depth = np.asarray(depth, dtype=np.float64)
    valid = depth[valid_depth(depth, max_depth=None)]
    if valid.size == 0:
        return 1.0, 2.0
    low, high = np.percentile(valid, [2.0, 98.0])
    if high <= low:
        high = low + max(abs(low) * 1e-3, 1e-6)
    return float(low), float(high)


def colorize_depth(depth, low=None, high=None, near_is_warm=True):
    """Colour image of a depth map: (H, W) or (H, W, 1) metres -> (H, W, 3) uint8 RGB.

    ``low``/``high``: the metres mapped to the two ends of the colour map (default
    ``depth_range(depth)``). Invalid pixels (<= 0 or not finite) are black.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise ValueError(f"expected a depth map (H, W) or (H, W, 1), found shape {depth.shape}")
    if low is None or high is None:
        default_low, default_high = depth_range(depth)
        low = default_low if low is None else low
        high = default_high if high is None else high
    valid = valid_depth(depth, max_depth=None)
    scaled = (np.where(valid, depth, low) - low) / max(high - low, 1e-12)
    colours = turbo(1.0 - scaled if near_is_warm else scaled)
    colours[~valid] = 0
    return colours
