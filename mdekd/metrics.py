"""Depth evaluation metrics (design.md §2): per image over its valid pixels, then averaged over images.

Definitions are those of BTS ``compute_errors`` as used by the MAI 2021 numpy evaluation, with
natural-log si-RMSE (not ×100). Predictions are clipped to [min_depth, max_depth] first. An image
without any valid ground-truth pixel is skipped (it has no error to report); when no image of the
data has one, every metric is NaN, the honest "no data" value — nothing else returns NaN.

Three ways to get the same numbers:
- ``per_image_depth_metrics``: TF ops for a ``tf.function`` (a Keras ``test_step`` feeds the
  values to ``keras.metrics.Mean.update_state(values, sample_weight=has_valid)``);
- ``depth_metrics``: one batch of numpy arrays or tensors -> dict of Python floats;
- ``DepthMetricsAccumulator`` (exactly ``depth_metrics`` of the concatenated batches) and
  ``StreamingDepthMetrics`` (a ``keras.metrics.Metric``, float32 sums) for whole datasets.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from mdekd.constants import MAX_DEPTH, MIN_DEPTH, valid_depth

METRIC_NAMES = (
    "si_rmse",
    "rmse",
    "abs_rel",
    "sq_rel",
    "rmse_log",
    "log10",
    "delta1",
    "delta2",
    "delta3",
)
DELTA_BASE = 1.25  # design.md §2; delta_k counts max(p/t, t/p) < 1.25^k
_LN_10 = math.log(10.0)


def per_image_depth_metrics(depth_true, depth_pred, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH):
    """Metrics of each image over its valid pixels, as TF ops (design.md §2).

    depth_true, depth_pred: (B, H, W, 1) metres, 0 = invalid truth; valid where
    ``min_depth < t <= max_depth`` (``max_depth=None``: no cap). Predictions are clipped to
    [min_depth, max_depth]. Returns ``(values, has_valid)``: ``values`` maps each name of
    ``METRIC_NAMES`` to a (B,) float32 tensor (0 for images without valid pixels, never NaN),
    ``has_valid`` is a (B,) bool tensor.
    """
    depth_true = tf.cast(depth_true, tf.float32)
    depth_pred = tf.maximum(tf.cast(depth_pred, tf.float32), min_depth)
    is_valid = valid_depth(depth_true, min_depth, max_depth)
    if max_depth is not None:
        depth_pred = tf.minimum(depth_pred, max_depth)
    mask = tf.cast(is_valid, tf.float32)
    # A harmless 1 m where the truth is invalid keeps every intermediate finite.
    truth = tf.where(is_valid, depth_true, tf.ones_like(depth_true))
    pred = tf.where(is_valid, depth_pred, tf.ones_like(depth_pred))
    count = tf.reduce_sum(mask, axis=[1, 2, 3])

    def image_mean(per_pixel):
        return tf.math.divide_no_nan(tf.reduce_sum(per_pixel * mask, axis=[1, 2, 3]), count)

    error = pred - truth
    log_error = tf.math.log(pred) - tf.math.log(truth)
    ratio = tf.maximum(pred / truth, truth / pred)
    # Variance of the log error in centred form: design.md §2's mean(g²) - mean(g)², without the
    # cancellation a large common offset causes; clamped at 0 against rounding before the sqrt.
    log_mean = image_mean(log_error)
    si_variance = image_mean(tf.square(log_error - log_mean[:, None, None, None]))
    values = {
        "si_rmse": tf.sqrt(tf.maximum(si_variance, 0.0)),
        "rmse": tf.sqrt(image_mean(tf.square(error))),
        "abs_rel": image_mean(tf.abs(error) / truth),
        "sq_rel": image_mean(tf.square(error) / truth),
        "rmse_log": tf.sqrt(image_mean(tf.square(log_error))),
        "log10": image_mean(tf.abs(log_error)) / _LN_10,
    }
    for k in (1, 2, 3):
        values[f"delta{k}"] = image_mean(tf.cast(ratio < DELTA_BASE**k, tf.float32))
    return values, count > 0


def _as_batch(array, name):
    """(B, H, W, 1), (H, W, 1) or (H, W) -> float32 numpy (B, H, W, 1)."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:
        array = array[None, :, :, None]
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 1:
        raise ValueError(
            f"{name}: expected depth of shape (B, H, W, 1), (H, W, 1) or (H, W), "
            f"found {array.shape}"
        )
    return array


class DepthMetricsAccumulator:
    """Streaming design.md §2 metrics over a whole dataset, batch by batch.

    Keeps the per-image values of every image with a valid pixel, so ``result()`` is exactly
    ``depth_metrics`` of all batches concatenated, however the data were split.
    """

    def __init__(self, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH):
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.reset()

    def reset(self):
        self._values = {name: [] for name in METRIC_NAMES}

    @property
    def num_images(self):
        """Images seen so far that have at least one valid pixel (the others are skipped)."""
        return len(self._values[METRIC_NAMES[0]])

    def update(self, depth_true, depth_pred):
        """Add a batch: arrays or tensors of shape (B, H, W, 1), (H, W, 1) or (H, W), metres."""
        depth_true = _as_batch(depth_true, "depth_true")
        depth_pred = _as_batch(depth_pred, "depth_pred")
        if depth_true.shape != depth_pred.shape:
            raise ValueError(
                f"depth_true and depth_pred must have the same shape, found {depth_true.shape} "
                f"and {depth_pred.shape}"
            )
        values, has_valid = per_image_depth_metrics(
            depth_true, depth_pred, self.min_depth, self.max_depth
        )
        keep = has_valid.numpy()
        for name in METRIC_NAMES:
            self._values[name].extend(values[name].numpy()[keep].tolist())

    def result(self):
        """Mean over the images with a valid pixel: dict name -> float (NaN if there is none)."""
        count = self.num_images
        return {
            name: math.fsum(self._values[name]) / count if count else math.nan
            for name in METRIC_NAMES
        }


def depth_metrics(depth_true, depth_pred, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH):
    """design.md §2 metrics of a batch: per image over its valid pixels, then the mean over images.

    depth_true, depth_pred: numpy arrays or tensors, (B, H, W, 1), (H, W, 1) or (H, W), metres.
    Images without a valid pixel are skipped. Returns dict name -> float (``METRIC_NAMES``),
    all NaN when no image has a valid pixel.
    """
    accumulator = DepthMetricsAccumulator(min_depth, max_depth)
    accumulator.update(depth_true, depth_pred)
    return accumulator.result()


class StreamingDepthMetrics(keras.metrics.Metric):
    """design.md §2 metrics as one Keras metric whose ``result()`` is a dict (float32 running sums).

    ``update_state(depth_true, depth_pred)`` with (B, H, W, 1) tensors; images without a valid
    pixel are skipped; results are 0 until an image with a valid pixel has been seen.
    """

    def __init__(self, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH, name="depth_metrics", **kwargs):
        super().__init__(name=name, **kwargs)
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.totals = self.add_variable(
            shape=(len(METRIC_NAMES),), initializer="zeros", name="totals", dtype="float32"
        )
        self.count = self.add_variable(shape=(), initializer="zeros", name="count", dtype="float32")

    def update_state(self, depth_true, depth_pred, sample_weight=None):
        values, has_valid = per_image_depth_metrics(
            depth_true, depth_pred, self.min_depth, self.max_depth
        )
        weight = tf.cast(has_valid, tf.float32)
        stacked = tf.stack([values[name] for name in METRIC_NAMES], axis=-1)  # (B, 9)
        self.totals.assign_add(tf.reduce_sum(stacked * weight[:, None], axis=0))
        self.count.assign_add(tf.reduce_sum(weight))

    def result(self):
        means = tf.math.divide_no_nan(self.totals, self.count)
        return {name: means[i] for i, name in enumerate(METRIC_NAMES)}

    def get_config(self):
        return {**super().get_config(), "min_depth": self.min_depth, "max_depth": self.max_depth}


def format_metrics_table(rows, digits=4, name_header="name"):
    """Markdown table: one row per entry of ``rows`` (name -> metrics dict), one column per metric.

    Columns are the ``METRIC_NAMES`` present in any row, in that order, then any other keys in
    first-seen order; a missing value is left blank.
    """
    keys = [name for name in METRIC_NAMES if any(name in row for row in rows.values())]
    for row in rows.values():
        keys += [key for key in row if key not in keys]

    def cell(value):
        if value is None:
            return ""
        try:
            return f"{float(value):.{digits}f}"
        except (TypeError, ValueError):
            return str(value)

    lines = [
        "| " + " | ".join([name_header, *keys]) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(keys)) + "|",
    ]
    for row_name, row in rows.items():
        lines.append("| " + " | ".join([str(row_name)] + [cell(row.get(k)) for k in keys]) + " |")
    return "\n".join(lines)
