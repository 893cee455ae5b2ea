"""tf.data pipeline: (image, depth) batches from any layout of ``mdekd.data.pairs``.

Yields ``image`` (B, H, W, 3) float32 RGB in [0, 1] and ``depth`` (B, H, W, 1) float32 metres,
0 = invalid (stored 0, <= MIN_DEPTH or > max_depth). Depth PNGs are decoded as uint16
(``tf.io.decode_png(..., dtype=tf.uint16)``; the default uint8 silently returns value >> 8,
toolchain.md §15). Files are checked up front from their headers (``validate``), so an 8-bit or
colour depth PNG, a size mismatch or an unreadable file is reported by name before training.

Order and augmentation are a function of ``seed`` alone: each epoch's order is a stateless
permutation seeded by (seed, epoch) and each element's augmentation seed is derived from
(seed, running element index), so two pipelines with the same arguments give identical batches
regardless of parallelism or of TensorFlow's global seed.
"""

from __future__ import annotations


import tensorflow as tf

from mdekd.constants import MAX_DEPTH, valid_depth
from mdekd.data.augment import augment_example
from mdekd.data.pairs import check_pairs, list_images, list_pairs, resolve_layout

_SHUFFLE_TAG, _AUGMENT_TAG = 1, 2  # keep the two random streams derived from one seed apart


def num_examples(root, split: str = "train", dataset: str = "mai2021", **layout_options) -> int:
    """Number of RGB/depth pairs in a split (errors as ``list_pairs``)."""
    return len(list_pairs(root, split, dataset, **layout_options))


def decode_depth(png_bytes, depth_scale: float):
    """uint16 PNG bytes -> (H, W, 1) float32 metres (value / (1 / depth_scale), 0 kept)."""
    values = tf.io.decode_png(png_bytes, channels=1, dtype=tf.uint16)
    return tf.cast(values, tf.float32) / tf.constant(1.0 / depth_scale, tf.float32)


def decode_rgb(image_bytes):
    """8-bit PNG or JPEG bytes -> (H, W, 3) float32 in [0, 1].

    JPEG uses the accurate integer IDCT, as PIL does, so both readers agree to about a grey level
    (TF's default fast IDCT differs by up to ~5 levels).
    """
    image = tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_png(image_bytes, channels=3))
    return tf.cast(tf.ensure_shape(image, [None, None, 3]), tf.float32) / 255.0


def mask_invalid(depth, max_depth: float | None = MAX_DEPTH):
    """Zero depths outside the valid range MIN_DEPTH < d <= max_depth (None = no cap)."""
    return tf.where(valid_depth(depth, max_depth=max_depth), depth, tf.zeros_like(depth))


def build_dataset(root, split: str = "train", dataset: str = "mai2021", *, batch_size: int = 8,
                  image_size=None, augment: bool = False, shuffle: bool | None = None, seed: int = 0,
                  repeat: bool = False, depth_scale: float | None = None, drop_remainder: bool | None = None,
                  max_depth: float | None = MAX_DEPTH, validate: str = "headers", allow_unpaired: bool = False,
                  return_index: bool = False, **layout_options) -> tf.data.Dataset:
    """Batches ``(image (B, H, W, 3) float32 [0, 1], depth (B, H, W, 1) float32 metres, 0 = invalid)``.

    image_size: (H, W) to resize to (image bilinear with antialiasing, depth nearest); None keeps
        the stored size, which must then be the same for every pair.
    augment: ``augment.augment_example`` (joint flip / zoom / rotation, image-only colour jitter),
        applied after resizing so the zoom resamples at most 1.25× at the output size.
    shuffle: None = shuffle the "train" split only. drop_remainder: None = same as shuffle.
    depth_scale: metres per stored depth unit; None = the layout's (required for "folder").
    validate: "headers" (default; format, mode and size of every file from its header, ~60 µs
        a pair), "full" (also checksums whole PNGs, catches truncated files) or "none".
    return_index: also yield each example's pair index (B,) int32 (position in ``list_pairs``),
        e.g. to look up precomputed teacher targets.
    layout_options: overrides of the layout fields (``rgb_dir``, ``depth_prefix``, ...).
    """
    layout = resolve_layout(dataset, **layout_options)
    depth_scale = layout.depth_scale if depth_scale is None else depth_scale
    if depth_scale is None or depth_scale <= 0:
        raise ValueError(f"dataset {dataset!r} needs depth_scale= (metres per stored depth unit, e.g. 0.001 "
                         f"for millimetres, 1/256 for KITTI), got {depth_scale!r}")
    if validate not in ("headers", "full", "none"):
        raise ValueError(f"validate must be 'headers', 'full' or 'none', got {validate!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = list_pairs(root, split, dataset, allow_unpaired=allow_unpaired, **layout_options)
    stored_size = None
    if validate != "none":
        sizes = sorted(set(check_pairs(pairs, full=validate == "full")))
        if len(sizes) == 1:
            stored_size = sizes[0]
        elif image_size is None and batch_size > 1:
            raise ValueError(f"images of {root}/{split} have {len(sizes)} different sizes (H, W) "
                             f"{sizes[:4]}...; pass image_size=(H, W) to resize them to one size")
    if image_size is not None:
        image_size = (int(image_size[0]), int(image_size[1]))

    shuffle = split == "train" if shuffle is None else shuffle
    drop_remainder = shuffle if drop_remainder is None else drop_remainder
    return _image_pipeline([rgb for rgb, _ in pairs], [depth for _, depth in pairs], depth_scale,
                           source=f"{root}/{split}", batch_size=batch_size, image_size=image_size,
                           stored_size=stored_size, augment=augment, shuffle=shuffle, seed=seed,
                           repeat=repeat, drop_remainder=drop_remainder, max_depth=max_depth,
                           return_index=return_index)


def build_unlabeled_dataset(root, *, batch_size: int, image_size, augment: bool = False,
                            shuffle: bool = True, seed: int = 0, repeat: bool = True,
                            return_index: bool = False) -> tf.data.Dataset:
    """Batches of photos without depth: ``(image (B, H, W, 3) [0, 1], depth (B, H, W, 1) all 0)``.

    root: any folder of RGB images (PNG/JPEG, searched recursively, any size; ``list_images``),
    each resized to ``image_size`` (H, W). Depth 0 everywhere means "unlabelled": the supervised
    losses skip such frames and the distillation terms teach them (``--unlabeled_dir``). Order and
    augmentation follow ``seed`` as in ``build_dataset``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = list_images(root)
    if shuffle and len(images) < batch_size:
        raise ValueError(f"--unlabeled_dir {root} holds {len(images)} image(s), fewer than the "
                         f"{batch_size} unlabelled frames each batch needs")
    return _image_pipeline(images, None, 1.0, source=str(root), batch_size=batch_size,
                           image_size=(int(image_size[0]), int(image_size[1])), stored_size=None,
                           augment=augment, shuffle=shuffle, seed=seed, repeat=repeat,
                           drop_remainder=shuffle, max_depth=None, return_index=return_index)


def mix_batches(labelled: tf.data.Dataset, unlabelled: tf.data.Dataset) -> tf.data.Dataset:
    """Each batch = a labelled batch followed by an unlabelled one, concatenated along B (so a
    batch holds exactly the two batch sizes' ratio). Elements are tuples of equal structure."""
    def concatenate(first, second):
        return tf.nest.map_structure(lambda a, b: tf.concat([a, b], axis=0), first, second)

    return tf.data.Dataset.zip(labelled, unlabelled).map(concatenate).prefetch(tf.data.AUTOTUNE)


def _image_pipeline(rgb_files, depth_files, depth_scale, *, source, batch_size, image_size,
                    stored_size, augment, shuffle, seed, repeat, drop_remainder, max_depth,
                    return_index):
    """The shared tf.data pipeline; ``depth_files=None`` gives all-zero (unlabelled) depth."""
    output_size = image_size or stored_size  # static (H, W) when known
    count = len(rgb_files)
    if drop_remainder and count < batch_size:
        raise ValueError(f"{source} has {count} pair(s), fewer than batch_size={batch_size}, and "
                         f"drop_remainder is on (the default when shuffling): no batch would be produced")
    rgb_paths = tf.constant(rgb_files)
    depth_paths = None if depth_files is None else tf.constant(depth_files)
    shuffle_seed = tf.constant([seed, _SHUFFLE_TAG], tf.int64)
    augment_seed = tf.constant([seed, _AUGMENT_TAG], tf.int64)

    def epoch_order(epoch):
        if shuffle:
            keys = tf.random.stateless_uniform(
                [count], tf.random.experimental.stateless_fold_in(shuffle_seed, epoch))
            order = tf.argsort(keys)
        else:
            order = tf.range(count)
        running = epoch * count + tf.range(count, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices((order, running))

    def load(index, running):
        rgb_path = rgb_paths[index]
        image = decode_rgb(tf.io.read_file(rgb_path))
        if depth_paths is None:
            depth = tf.zeros_like(image[..., :1])
        else:
            depth_path = depth_paths[index]
            depth = decode_depth(tf.io.read_file(depth_path), depth_scale)
            same_size = tf.debugging.Assert(  # a backstop for validate="none"; names both files
                tf.reduce_all(tf.shape(image)[:2] == tf.shape(depth)[:2]),
                ["RGB and depth sizes (H, W) differ:", rgb_path, tf.shape(image)[:2], depth_path,
                 tf.shape(depth)[:2]])
            with tf.control_dependencies([same_size]):
                image = tf.identity(image)
        if image_size is not None and image_size != stored_size:
            image = tf.image.resize(image, image_size, method="bilinear", antialias=True)
            depth = tf.image.resize(depth, image_size, method="nearest")
        if augment:
            image, depth = augment_example(
                image, depth, tf.random.experimental.stateless_fold_in(augment_seed, running))
        image = tf.clip_by_value(image, 0.0, 1.0)  # antialiased resampling may overshoot slightly
        depth = mask_invalid(depth, max_depth)
        height, width = output_size or (None, None)
        example = (tf.ensure_shape(image, [height, width, 3]), tf.ensure_shape(depth, [height, width, 1]))
        return (*example, tf.cast(index, tf.int32)) if return_index else example

    epochs = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(1)
    data = epochs.flat_map(epoch_order)
    data = data.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    data = data.batch(batch_size, drop_remainder=drop_remainder)
    return data.prefetch(tf.data.AUTOTUNE)
