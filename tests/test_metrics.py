"""design.md §2 depth metrics: hand-computed values, an independent numpy reference, streaming forms."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdekd import metrics
from mdekd.constants import MAX_DEPTH, MIN_DEPTH


def reference_compute_errors(gt, pred):
    """BTS ``compute_errors`` (natural-log si-RMSE, not ×100) on the valid pixels of one image."""
    gt, pred = gt.astype(np.float64), pred.astype(np.float64)
    thresh = np.maximum(gt / pred, pred / gt)
    err = np.log(pred) - np.log(gt)
    return {
        "si_rmse": np.sqrt(np.mean(err**2) - np.mean(err) ** 2),
        "rmse": np.sqrt(np.mean((gt - pred) ** 2)),
        "abs_rel": np.mean(np.abs(gt - pred) / gt),
        "sq_rel": np.mean((gt - pred) ** 2 / gt),
        "rmse_log": np.sqrt(np.mean(err**2)),
        "log10": np.mean(np.abs(np.log10(gt) - np.log10(pred))),
        "delta1": np.mean(thresh < 1.25),
        "delta2": np.mean(thresh < 1.25**2),
        "delta3": np.mean(thresh < 1.25**3),
    }


def reference_depth_metrics(depth_true, depth_pred, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH):
    """MAI 2021-style evaluation: clip, per image over valid pixels, mean over images with any."""
    per_image = []
    for t, p in zip(depth_true, depth_pred):
        valid = (t > min_depth) & (t <= max_depth)
        if valid.any():
            clipped = np.clip(p, min_depth, max_depth)
            per_image.append(reference_compute_errors(t[valid], clipped[valid]))
    return {name: np.mean([row[name] for row in per_image]) for name in metrics.METRIC_NAMES}


def random_batch(batch, seed, height=6, width=7):
    rng = np.random.default_rng(seed)
    shape = (batch, height, width, 1)
    truth = rng.uniform(0.3, 45.0, shape).astype(np.float32)
    truth[rng.random(shape) < 0.25] = 0.0
    pred = (truth * rng.uniform(0.5, 1.8, shape) + rng.uniform(0.0, 3.0, shape)).astype(np.float32)
    pred[rng.random(shape) < 0.05] = 0.0
    pred[rng.random(shape) < 0.05] = 60.0
    return truth, pred


def assert_metrics_close(got, expected, rtol=1e-5):
    assert set(got) == set(metrics.METRIC_NAMES)
    for name in metrics.METRIC_NAMES:
        np.testing.assert_allclose(got[name], expected[name], rtol=rtol, atol=1e-7, err_msg=name)


def test_two_by_two_example_matches_hand_computation():
    # Valid truth (1, 2, 4) (the 0 is invalid), predictions (2, 2, 6): errors (1, 0, 2),
    # log errors g = (ln 2, 0, ln 1.5), ratios (2, 1, 1.5).
    truth = np.array([[1.0, 2.0], [4.0, 0.0]], np.float32)
    pred = np.array([[2.0, 2.0], [6.0, 3.0]], np.float32)
    ln2, ln15 = math.log(2.0), math.log(1.5)
    mean_sq = (ln2**2 + ln15**2) / 3
    expected = {
        "si_rmse": math.sqrt(mean_sq - ((ln2 + ln15) / 3) ** 2),
        "rmse": math.sqrt((1 + 0 + 4) / 3),
        "abs_rel": (1 / 1 + 0 / 2 + 2 / 4) / 3,
        "sq_rel": (1 / 1 + 0 / 2 + 4 / 4) / 3,
        "rmse_log": math.sqrt(mean_sq),
        "log10": (math.log10(2.0) + math.log10(1.5)) / 3,
        "delta1": 1 / 3,  # only the ratio 1 is below 1.25
        "delta2": 2 / 3,  # 1.5 < 1.5625
        "delta3": 2 / 3,  # 2 > 1.953125
    }
    assert_metrics_close(metrics.depth_metrics(truth, pred), expected)


def test_metrics_match_bts_compute_errors_reference_on_random_batch():
    truth, pred = random_batch(4, seed=0)
    truth[2] = 0.0  # one image without valid pixels
    assert_metrics_close(metrics.depth_metrics(truth, pred), reference_depth_metrics(truth, pred))


def test_metrics_average_per_image_not_over_pooled_pixels():
    # Image 0: one valid pixel with abs_rel 1. Image 1: three exact pixels, abs_rel 0.
    # Per image then mean: (1 + 0) / 2 = 0.5; pooled over the 4 pixels it would be 0.25.
    truth = np.array([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 2.0], [3.0, 0.0]]], np.float32)[..., None]
    pred = np.array([[[2.0, 1.0], [1.0, 1.0]], [[1.0, 2.0], [3.0, 1.0]]], np.float32)[..., None]
    result = metrics.depth_metrics(truth, pred)
    assert result["abs_rel"] == pytest.approx(0.5, rel=1e-6)
    assert result["delta1"] == pytest.approx(0.5, rel=1e-6)


def test_predictions_are_clipped_to_depth_range():
    # Far prediction 100 -> 40 (exact for truth 40); negative prediction -> 1e-3 (truth 2e-3).
    truth = np.array([[MAX_DEPTH, 2 * MIN_DEPTH]], np.float32)
    pred = np.array([[100.0, -5.0]], np.float32)
    result = metrics.depth_metrics(truth, pred)
    assert result["abs_rel"] == pytest.approx((0.0 + 0.5) / 2, rel=1e-5)
    assert result["rmse"] == pytest.approx(math.sqrt((0.0 + MIN_DEPTH**2) / 2), rel=1e-4)


def test_no_depth_cap_keeps_far_truth_and_predictions():
    truth = np.array([[50.0, 10.0]], np.float32)
    pred = np.array([[60.0, 10.0]], np.float32)
    capped = metrics.depth_metrics(truth, pred)
    uncapped = metrics.depth_metrics(truth, pred, max_depth=None)
    assert capped["rmse"] == pytest.approx(0.0, abs=1e-7)  # 50 m truth is invalid under the cap
    assert uncapped["rmse"] == pytest.approx(math.sqrt(100.0 / 2), rel=1e-6)


def test_image_without_valid_pixels_is_skipped():
    truth, pred = random_batch(2, seed=1)
    alone = metrics.depth_metrics(truth[:1], pred[:1])
    truth[1] = 0.0
    assert_metrics_close(metrics.depth_metrics(truth, pred), alone, rtol=1e-7)


def test_no_valid_pixel_at_all_gives_nan_for_every_metric():
    result = metrics.depth_metrics(np.zeros((2, 3, 3, 1)), np.ones((2, 3, 3, 1)))
    assert set(result) == set(metrics.METRIC_NAMES)
    assert all(math.isnan(value) for value in result.values())


def test_per_image_metrics_are_finite_zeros_for_empty_image():
    truth, pred = random_batch(3, seed=2)
    truth[1] = 0.0
    values, has_valid = metrics.per_image_depth_metrics(tf.constant(truth), tf.constant(pred))
    assert tuple(values) == metrics.METRIC_NAMES
    np.testing.assert_array_equal(has_valid.numpy(), [True, False, True])
    for name, per_image in values.items():
        assert per_image.shape == (3,) and per_image.dtype == tf.float32
        assert per_image.numpy()[1] == 0.0, name
        assert np.all(np.isfinite(per_image.numpy())), name


def test_per_image_metrics_in_tf_function_match_weighted_keras_mean():
    truth, pred = random_batch(3, seed=3)
    truth[0] = 0.0
    compiled = tf.function(metrics.per_image_depth_metrics)
    values, has_valid = compiled(tf.constant(truth), tf.constant(pred))
    mean = keras.metrics.Mean()
    mean.update_state(values["rmse"], sample_weight=tf.cast(has_valid, tf.float32))
    expected = reference_depth_metrics(truth, pred)["rmse"]
    np.testing.assert_allclose(float(mean.result()), expected, rtol=1e-5)


def test_single_image_shapes_are_accepted():
    truth, pred = random_batch(1, seed=4)
    batched = metrics.depth_metrics(truth, pred)
    assert metrics.depth_metrics(truth[0], pred[0]) == batched
    assert metrics.depth_metrics(truth[0, ..., 0], pred[0, ..., 0]) == batched
    assert metrics.depth_metrics(tf.constant(truth), tf.constant(pred)) == batched


def test_wrong_depth_shape_raises_value_error():
    with pytest.raises(ValueError, match="depth_true"):
        metrics.depth_metrics(np.ones((2, 4, 4, 3)), np.ones((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="same shape"):
        metrics.depth_metrics(np.ones((2, 4, 4, 1)), np.ones((2, 4, 5, 1)))


def test_accumulator_over_batches_equals_depth_metrics_of_concatenation():
    batches = [random_batch(b, seed=10 + b) for b in (3, 1, 2)]
    batches[1][0][:] = 0.0  # a batch whose only image has no valid pixel
    accumulator = metrics.DepthMetricsAccumulator()
    for truth, pred in batches:
        accumulator.update(truth, pred)
    all_truth = np.concatenate([t for t, _ in batches])
    all_pred = np.concatenate([p for _, p in batches])
    assert accumulator.num_images == 5
    assert accumulator.result() == metrics.depth_metrics(all_truth, all_pred)


def test_accumulator_reset_forgets_images():
    accumulator = metrics.DepthMetricsAccumulator()
    accumulator.update(*random_batch(2, seed=20))
    accumulator.reset()
    truth, pred = random_batch(1, seed=21)
    accumulator.update(truth, pred)
    assert accumulator.num_images == 1
    assert accumulator.result() == metrics.depth_metrics(truth, pred)


def test_keras_streaming_metric_matches_depth_metrics():
    batches = [random_batch(2, seed=30 + i) for i in range(3)]
    batches[0][0][1] = 0.0
    metric = metrics.StreamingDepthMetrics()
    for truth, pred in batches:
        metric.update_state(tf.constant(truth), tf.constant(pred))
    expected = metrics.depth_metrics(
        np.concatenate([t for t, _ in batches]), np.concatenate([p for _, p in batches])
    )
    assert_metrics_close({k: float(v) for k, v in metric.result().items()}, expected)
    metric.reset_state()
    assert all(float(v) == 0.0 for v in metric.result().values())


def test_format_metrics_table_renders_markdown_rows():
    table = metrics.format_metrics_table(
        {"student": {"rmse": 3.25, "si_rmse": 0.2602}, "teacher": {"rmse": 2.5, "ms": 12}}
    )
    assert table.splitlines() == [
        "| name | si_rmse | rmse | ms |",
        "|---|---:|---:|---:|",
        "| student | 0.2602 | 3.2500 |  |",
        "| teacher |  | 2.5000 | 12.0000 |",
    ]
