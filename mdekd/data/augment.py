"""Training augmentation for (image, depth) pairs, usable inside ``tf.data.Dataset.map``.

Geometric transforms (horizontal flip, crop-and-resize zoom, small rotation) are composed into
ONE projective transform applied to image and depth together (design.md §3): the image is resampled
bilinearly, the depth with NEAREST neighbour and constant fill 0, so every output depth is either
an input depth value or 0 (invalid) and invalid pixels never blend into valid ones.

Zoom does **not** rescale depth. Cropping a region and resizing it to the full frame is exactly
what a camera with a longer focal length would see from the same place, and depth along the
optical axis (z, metres) does not depend on the focal length, so the stored metres remain the
truth for the zoomed image. The price is a cue conflict (objects look bigger, not nearer), which
is why the default zoom is small (at most 1/0.8 = 1.25×). Photometric transforms (brightness,
contrast, saturation, gamma) touch the image only and clip it to [0, 1].

All randomness is stateless: every function takes a ``seed`` of shape (2,) int, so a pipeline
that derives one seed per element is deterministic whatever its parallelism.
"""

from __future__ import annotations

import math

import tensorflow as tf


def random_geometric(image, depth, seed, *, flip: bool = True, crop_fraction=(0.8, 1.0),
                     max_rotation_degrees: float = 5.0, image_interpolation: str = "BILINEAR"):
    """Jointly flip, crop-resize and rotate one example.

    image (H, W, 3) float32, depth (H, W, 1) float32 metres (0 = invalid), seed (2,) int.
    crop_fraction: range of the crop side relative to the frame (1 = no zoom); the crop keeps the
    aspect ratio and lies inside the frame. Rotation is about the crop centre, uniform in
    ±max_rotation_degrees; corners it uncovers get depth 0 and reflected image content.
    Returns (image, depth) of the input shapes.
    """
    flip_seed, crop_seed, shift_seed, angle_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=4))
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)

    low, high = crop_fraction
    scale = tf.random.stateless_uniform([], crop_seed, minval=low, maxval=high) if low < high \
        else tf.constant(float(low))
    # the crop centre may move by up to half the margin the crop leaves on each side
    shift = tf.random.stateless_uniform([2], shift_seed, minval=-1.0, maxval=1.0) * (1.0 - scale) / 2.0
    angle = tf.random.stateless_uniform([], angle_seed, minval=-1.0, maxval=1.0) * (
        max_rotation_degrees * math.pi / 180.0)
    mirror = tf.where(tf.random.stateless_uniform([], flip_seed) < 0.5, -1.0, 1.0) if flip else 1.0

    # output pixel (x, y) -> input pixel, both centred on the frame; pixel centres at integers
    cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
    a0, a1 = mirror * cos, -mirror * sin
    b0, b1 = sin, cos
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    a2 = cx + shift[0] * width - (a0 * cx + a1 * cy)
    b2 = cy + shift[1] * height - (b0 * cx + b1 * cy)
    transform = tf.reshape(tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0]), (1, 8))

    def warp(x, interpolation, fill_mode):
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None], transforms=transform, output_shape=shape[:2], fill_value=0.0,
            interpolation=interpolation, fill_mode=fill_mode)[0]

    image = warp(image, image_interpolation.upper(), "REFLECT")
    depth = warp(depth, "NEAREST", "CONSTANT")  # never blends: each value is an input value or 0
    return tf.ensure_shape(image, [None, None, 3]), tf.ensure_shape(depth, [None, None, 1])


def random_photometric(image, seed, *, brightness: float = 0.1, contrast=(0.8, 1.2),
                       saturation=(0.8, 1.2), gamma=(0.8, 1.2)):
    """Image-only colour jitter; (H, W, 3) float32 in [0, 1] -> same, clipped to [0, 1].

    gamma: exponent range; brightness: additive delta in ±brightness; contrast and saturation:
    factor ranges (tf.image semantics). Pass 0 / (1, 1) to disable one.
    """
    gamma_seed, brightness_seed, contrast_seed, saturation_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=4))
    image = tf.clip_by_value(image, 0.0, 1.0)
    if gamma[0] != gamma[1]:
        image = image ** tf.random.stateless_uniform([], gamma_seed, minval=gamma[0], maxval=gamma[1])
    if brightness:
        image = tf.image.stateless_random_brightness(image, brightness, brightness_seed)
    if contrast[0] != contrast[1]:
        image = tf.image.stateless_random_contrast(tf.clip_by_value(image, 0.0, 1.0), *contrast, contrast_seed)
    if saturation[0] != saturation[1]:
        # HSV conversion expects [0, 1]
        image = tf.image.stateless_random_saturation(tf.clip_by_value(image, 0.0, 1.0), *saturation,
                                                     saturation_seed)
    return tf.clip_by_value(image, 0.0, 1.0)


def augment_example(image, depth, seed, *, geometric: bool = True, photometric: bool = True):
    """Default training augmentation: random_geometric, then random_photometric on the image only.

    image (H, W, 3) float32 [0, 1], depth (H, W, 1) float32 metres, seed (2,) int; returns both.
    """
    image, depth = tf.convert_to_tensor(image, tf.float32), tf.convert_to_tensor(depth, tf.float32)
    geometric_seed, photometric_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    if geometric:
        image, depth = random_geometric(image, depth, geometric_seed)
    if photometric:
        image = random_photometric(image, photometric_seed)
    return image, depth
