"""design.md §1 losses against independent numpy references (plain loops, float64); their promises."""

import math

import numpy as np
import pytest
import tensorflow as tf

from mdekd import losses
from mdekd.constants import MAX_DEPTH, MIN_DEPTH

# ----------------------------------------------------------------------------------------------
# Independent numpy references, written from docs/design.md (not from mdekd code).


def reference_valid(depth_true, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH):
    valid = depth_true > min_depth
    if max_depth is not None:
        valid &= depth_true <= max_depth
    return valid


def reference_si(depth_true, depth_pred, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH):
    batch = depth_true.shape[0]
    total = 0.0
    for b in range(batch):
        t = depth_true[b, ..., 0].astype(np.float64)
        p = np.maximum(depth_pred[b, ..., 0].astype(np.float64), min_depth)
        valid = reference_valid(t, min_depth, max_depth)
        n = int(valid.sum())
        if n == 0:
            continue
        g = np.log(p[valid]) - np.log(t[valid])
        total += (g**2).sum() / n - g.sum() ** 2 / n**2
    return total / batch


def reference_gml(depth_true, depth_pred, num_scales=4, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH):
    t = depth_true[..., 0].astype(np.float64)
    p = np.maximum(depth_pred[..., 0].astype(np.float64), min_depth)
    valid = reference_valid(t, min_depth, max_depth)
    residual = np.zeros_like(t)
    residual[valid] = np.log(p[valid]) - np.log(t[valid])
    total = 0.0
    for k in range(num_scales):
        s = 2**k
        r, m = residual[:, ::s, ::s], valid[:, ::s, ::s]
        batch, height, width = r.shape
        abs_sum = 0.0
        for b in range(batch):
            for i in range(height):
                for j in range(width):
                    if j + 1 < width and m[b, i, j] and m[b, i, j + 1]:
                        abs_sum += abs(r[b, i, j + 1] - r[b, i, j])
                    if i + 1 < height and m[b, i, j] and m[b, i + 1, j]:
                        abs_sum += abs(r[b, i + 1, j] - r[b, i, j])
        count = int(m.sum())
        if count:
            total += abs_sum / count
    return total


def reference_pool(features, kh, kw):
    batch, height, width, channels = features.shape
    nh, nw = -(-height // kh), -(-width // kw)  # ceil mode: partial windows kept
    out = np.empty((batch, nh, nw, channels), dtype=np.float64)
    for i in range(nh):
        for j in range(nw):
            window = features[:, i * kh : (i + 1) * kh, j * kw : (j + 1) * kw, :]
            out[:, i, j, :] = window.max(axis=(1, 2))
    return out


def reference_affinity(features):
    batch, channels = features.shape[0], features.shape[-1]
    nodes = features.reshape(batch, -1, channels)
    nodes = nodes / (np.sqrt((nodes**2).sum(axis=-1, keepdims=True)) + 1e-8)
    return np.einsum("bmc,bnc->bmn", nodes, nodes)


def reference_pairwise(student, teacher, pool_scale=0.5):
    student, teacher = student.astype(np.float64), teacher.astype(np.float64)
    height, width = teacher.shape[1:3]
    if pool_scale is not None:
        kh, kw = max(int(height * pool_scale), 1), max(int(width * pool_scale), 1)
        student, teacher = reference_pool(student, kh, kw), reference_pool(teacher, kh, kw)
    num_nodes = teacher.shape[1] * teacher.shape[2]
    diff = reference_affinity(student) - reference_affinity(teacher)
    return (diff**2).sum() / num_nodes**2 / teacher.shape[0]


# ----------------------------------------------------------------------------------------------
# Inputs


def random_depth_pair(shape, seed):
    """Truth with invalid zeros, too-small and too-far values; predictions with zeros/negatives."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0.5, 45.0, shape).astype(np.float32)  # some beyond MAX_DEPTH = 40
    truth[rng.random(shape) < 0.2] = 0.0
    truth[rng.random(shape) < 0.05] = 5e-4  # positive but below MIN_DEPTH
    pred = (truth * rng.uniform(0.6, 1.6, shape) + rng.uniform(0.1, 2.0, shape)).astype(np.float32)
    pred[rng.random(shape) < 0.05] = 0.0
    pred[rng.random(shape) < 0.05] = -1.5
    return truth, pred


DEPTH_SHAPES = [(2, 7, 9, 1), (3, 16, 16, 1), (1, 33, 20, 1)]


def scalar(tensor):
    return float(tensor.numpy())


# ----------------------------------------------------------------------------------------------
# Scale-invariant loss


@pytest.mark.parametrize("shape", DEPTH_SHAPES)
def test_scale_invariant_loss_matches_numpy_reference(shape):
    truth, pred = random_depth_pair(shape, seed=shape[1])
    got = scalar(losses.scale_invariant_loss(truth, pred))
    np.testing.assert_allclose(got, reference_si(truth, pred), rtol=1e-5)


def test_scale_invariant_loss_without_depth_cap_uses_far_pixels():
    truth, pred = random_depth_pair((2, 8, 8, 1), seed=1)
    capped = scalar(losses.scale_invariant_loss(truth, pred))
    uncapped = scalar(losses.scale_invariant_loss(truth, pred, max_depth=None))
    np.testing.assert_allclose(uncapped, reference_si(truth, pred, max_depth=None), rtol=1e-5)
    assert abs(uncapped - capped) > 1e-4


def test_scale_invariant_loss_hand_example():
    # g = (ln e - ln 1, 0) = (1, 0): L = (1/2)·1 - (1/4)·1 = 0.25.
    truth = np.array([1.0, 1.0], np.float32).reshape(1, 1, 2, 1)
    pred = np.array([math.e, 1.0], np.float32).reshape(1, 1, 2, 1)
    np.testing.assert_allclose(scalar(losses.scale_invariant_loss(truth, pred)), 0.25, rtol=1e-6)


def test_scale_invariant_loss_zero_when_prediction_is_scaled_truth():
    rng = np.random.default_rng(2)
    truth = rng.uniform(0.5, 30.0, (2, 6, 5, 1)).astype(np.float32)
    loss = scalar(losses.scale_invariant_loss(truth, 7.5 * truth))
    assert abs(loss) < 1e-10


def test_scale_invariant_loss_unchanged_by_scaling_prediction():
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.5, 30.0, (2, 6, 5, 1)).astype(np.float32)
    pred = rng.uniform(0.5, 30.0, (2, 6, 5, 1)).astype(np.float32)
    base = scalar(losses.scale_invariant_loss(truth, pred))
    scaled = scalar(losses.scale_invariant_loss(truth, 0.3 * pred))
    assert base > 0.1
    np.testing.assert_allclose(scaled, base, rtol=1e-5)


def test_scale_invariant_loss_counts_empty_image_as_zero_in_batch_mean():
    rng = np.random.default_rng(4)
    truth = rng.uniform(1.0, 10.0, (2, 4, 4, 1)).astype(np.float32)
    pred = rng.uniform(1.0, 10.0, (2, 4, 4, 1)).astype(np.float32)
    single = scalar(losses.scale_invariant_loss(truth[:1], pred[:1]))
    truth[1] = 0.0
    batch_loss = scalar(losses.scale_invariant_loss(truth, pred))
    np.testing.assert_allclose(batch_loss, single / 2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Gradient matching loss


@pytest.mark.parametrize("shape", DEPTH_SHAPES)
def test_gradient_matching_loss_matches_numpy_reference(shape):
    truth, pred = random_depth_pair(shape, seed=10 + shape[1])
    got = scalar(losses.gradient_matching_loss(truth, pred))
    np.testing.assert_allclose(got, reference_gml(truth, pred), rtol=1e-5)


@pytest.mark.parametrize("num_scales", [1, 2, 6])
def test_gradient_matching_loss_matches_reference_for_scale_count(num_scales):
    truth, pred = random_depth_pair((2, 13, 11, 1), seed=20)
    got = scalar(losses.gradient_matching_loss(truth, pred, num_scales=num_scales))
    np.testing.assert_allclose(got, reference_gml(truth, pred, num_scales), rtol=1e-5)


def test_gradient_matching_loss_hand_example_sums_scales():
    # R = ln 1 - ln(1, e, e²) = (0, -1, -2). Scale 1: diffs 1 + 1 over 3 pixels = 2/3;
    # scale 2 keeps (0, -2): 2 over 2 pixels = 1; scales 4, 8 keep one pixel: 0. Total 5/3.
    truth = np.array([1.0, math.e, math.e**2], np.float32).reshape(1, 1, 3, 1)
    pred = np.ones_like(truth)
    got = scalar(losses.gradient_matching_loss(truth, pred, num_scales=4))
    np.testing.assert_allclose(got, 5.0 / 3.0, rtol=1e-6)


def test_gradient_matching_loss_skips_differences_with_an_invalid_neighbour():
    # mask (1, 0, 1): no pair at scale 1 (0 over 2 pixels); scale 2 keeps (0, -1): 1 over 2.
    truth = np.array([1.0, 0.0, math.e], np.float32).reshape(1, 1, 3, 1)
    pred = np.ones_like(truth)
    got = scalar(losses.gradient_matching_loss(truth, pred, num_scales=2))
    np.testing.assert_allclose(got, 0.5, rtol=1e-6)


def test_gradient_matching_loss_divides_by_batch_valid_count_not_per_image():
    # Image 0: R row (0, -1), 2 valid pixels, diff sum 1. Image 1: 4 valid pixels, R = 0.
    # Batch-based: 1 / 6. A per-image mean would give (1/2 + 0) / 2 = 1/4.
    truth = np.ones((2, 1, 4, 1), np.float32)
    truth[0, 0, 1] = math.e
    truth[0, 0, 2:] = 0.0
    pred = np.ones_like(truth)
    got = scalar(losses.gradient_matching_loss(truth, pred, num_scales=1))
    np.testing.assert_allclose(got, 1.0 / 6.0, rtol=1e-6)


def test_gradient_matching_loss_unchanged_by_scaling_prediction():
    rng = np.random.default_rng(5)
    truth = rng.uniform(0.5, 30.0, (2, 9, 7, 1)).astype(np.float32)
    pred = rng.uniform(0.5, 30.0, (2, 9, 7, 1)).astype(np.float32)
    base = scalar(losses.gradient_matching_loss(truth, pred))
    assert base > 0.1
    scaled = scalar(losses.gradient_matching_loss(truth, 4.0 * pred))
    np.testing.assert_allclose(scaled, base, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Empty masks and degenerate predictions


@pytest.mark.parametrize("loss_fn", [losses.scale_invariant_loss, losses.gradient_matching_loss])
def test_all_invalid_truth_gives_exact_zero_and_finite_gradient(loss_fn):
    truth = tf.constant(np.array([0.0, 5e-4, 50.0, np.nan] * 6, np.float32).reshape(2, 3, 4, 1))
    pred = tf.Variable(np.full((2, 3, 4, 1), 2.0, np.float32))
    with tf.GradientTape() as tape:
        loss = loss_fn(truth, pred)
    grad = tape.gradient(loss, pred)
    assert scalar(loss) == 0.0
    assert np.all(np.isfinite(grad.numpy()))


@pytest.mark.parametrize("loss_fn", [losses.scale_invariant_loss, losses.gradient_matching_loss])
def test_zero_and_negative_predictions_are_clamped_to_min_depth(loss_fn):
    rng = np.random.default_rng(6)
    truth = rng.uniform(0.5, 30.0, (2, 5, 6, 1)).astype(np.float32)
    raw = rng.choice([0.0, -3.0, MIN_DEPTH / 2], size=truth.shape).astype(np.float32)
    pred = tf.Variable(raw)
    with tf.GradientTape() as tape:
        loss = loss_fn(truth, pred)
    grad = tape.gradient(loss, pred)
    clamped = scalar(loss_fn(truth, np.full_like(truth, MIN_DEPTH)))
    assert np.isfinite(scalar(loss)) and np.all(np.isfinite(grad.numpy()))
    np.testing.assert_allclose(scalar(loss), clamped, rtol=1e-6)


def test_valid_mask_follows_open_min_closed_max_interval():
    truth = np.array(
        [0.0, MIN_DEPTH, 2 * MIN_DEPTH, 10.0, MAX_DEPTH, MAX_DEPTH + 1, np.inf], np.float32
    )
    mask = losses.valid_mask(truth.reshape(1, 1, -1, 1)).numpy().ravel()
    np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1, 0, 0])
    uncapped = losses.valid_mask(truth, max_depth=None, dtype=tf.bool).numpy()
    np.testing.assert_array_equal(uncapped, [False, False, True, True, True, True, False])


def test_gradients_of_depth_losses_match_finite_differences():
    rng = np.random.default_rng(7)
    truth = rng.uniform(1.0, 5.0, (1, 3, 4, 1))
    truth[0, 1, 1] = 0.0
    pred0 = rng.uniform(1.0, 5.0, (1, 3, 4, 1))
    cases = (
        (losses.scale_invariant_loss, reference_si),
        (losses.gradient_matching_loss, reference_gml),
    )
    for loss_fn, reference in cases:
        pred = tf.Variable(pred0.astype(np.float32))
        with tf.GradientTape() as tape:
            loss = loss_fn(truth.astype(np.float32), pred)
        grad = tape.gradient(loss, pred).numpy()
        numeric = np.zeros_like(pred0)
        eps = 1e-6
        for idx in np.ndindex(pred0.shape):
            up, down = pred0.copy(), pred0.copy()
            up[idx] += eps
            down[idx] -= eps
            numeric[idx] = (reference(truth, up) - reference(truth, down)) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Pairwise distillation loss

PAIRWISE_CASES = [
    ((2, 7, 9), 0.5),  # kernel (3, 4): partial windows on both axes
    ((2, 7, 9), 0.25),
    ((2, 7, 9), 1 / 3),
    ((2, 7, 9), None),
    ((3, 8, 12), 0.5),  # exact 2 x 2 windows
    ((1, 5, 11), 1 / 3),
    ((2, 3, 4), 0.2),  # int(H·scale) = 0 -> kernel 1
]


@pytest.mark.parametrize("hw_shape, pool_scale", PAIRWISE_CASES)
def test_pairwise_loss_matches_numpy_reference(hw_shape, pool_scale):
    rng = np.random.default_rng(hw_shape[1] * 100 + hw_shape[2])
    student = rng.normal(size=hw_shape + (3,)).astype(np.float32)
    teacher = rng.normal(size=hw_shape + (5,)).astype(np.float32)
    got = scalar(losses.pairwise_distillation_loss(student, teacher, pool_scale=pool_scale))
    expected = reference_pairwise(student, teacher, pool_scale)
    assert expected > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_pairwise_pooling_pads_with_minus_infinity_not_zero():
    # All features negative: a zero-padded pool would put 0 into the partial windows.
    rng = np.random.default_rng(8)
    student = -rng.uniform(0.5, 2.0, (2, 7, 9, 3)).astype(np.float32)
    teacher = -rng.uniform(0.5, 2.0, (2, 7, 9, 4)).astype(np.float32)
    nodes = losses.affinity_nodes(teacher, losses.affinity_pool_size(7, 9, 0.5)).numpy()
    assert np.all(np.isfinite(nodes)) and np.all(nodes < 0)
    got = scalar(losses.pairwise_distillation_loss(student, teacher, pool_scale=0.5))
    np.testing.assert_allclose(got, reference_pairwise(student, teacher, 0.5), rtol=1e-5)


def test_partial_windows_give_ceil_node_count():
    # H = 7, W = 9, pool_scale 1/3: kernel (2, 3) -> ceil(7/2) · ceil(9/3) = 4 · 3 nodes.
    pool_size = losses.affinity_pool_size(7, 9, 1 / 3)
    nodes = losses.affinity_nodes(np.ones((2, 7, 9, 6), np.float32), pool_size)
    assert pool_size == (2, 3)
    assert tuple(nodes.shape) == (2, 12, 6)


def test_pairwise_loss_zero_for_identical_maps():
    rng = np.random.default_rng(9)
    features = rng.normal(size=(2, 8, 10, 4)).astype(np.float32)
    assert scalar(losses.pairwise_distillation_loss(features, features)) == 0.0


def test_pairwise_loss_invariant_to_teacher_channel_repetition():
    rng = np.random.default_rng(10)
    student = rng.normal(size=(2, 6, 8, 3)).astype(np.float32)
    teacher = rng.normal(size=(2, 6, 8, 4)).astype(np.float32)
    base = scalar(losses.pairwise_distillation_loss(student, teacher, pool_scale=None))
    tiled = np.tile(teacher, (1, 1, 1, 3))
    repeated = scalar(losses.pairwise_distillation_loss(student, tiled, pool_scale=None))
    assert base > 1e-3
    np.testing.assert_allclose(repeated, base, rtol=1e-5)


def test_pairwise_loss_rejects_maps_of_different_size():
    with pytest.raises(ValueError, match="same height"):
        losses.pairwise_distillation_loss(np.zeros((1, 4, 4, 2)), np.zeros((1, 8, 4, 2)))


def test_pairwise_gradient_reaches_student_only():
    rng = np.random.default_rng(11)
    student = tf.Variable(rng.normal(size=(2, 6, 6, 3)).astype(np.float32))
    teacher = tf.Variable(rng.normal(size=(2, 6, 6, 5)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = losses.pairwise_distillation_loss(student, teacher, pool_scale=None)
    grad_student, grad_teacher = tape.gradient(loss, [student, teacher])
    assert grad_teacher is None or not np.any(grad_teacher.numpy())
    assert np.abs(grad_student.numpy()).max() > 1e-4


def _pairwise_loss_fixed_norm(x, norm, teacher_affinity):
    """Numpy loss (no pooling) with each node divided by a *given* constant norm."""
    batch, channels = x.shape[0], x.shape[-1]
    nodes = x.reshape(batch, -1, channels) / norm
    affinity = np.einsum("bmc,bnc->bmn", nodes, nodes)
    return ((affinity - teacher_affinity) ** 2).sum() / nodes.shape[1] ** 2 / batch


def test_pairwise_gradient_holds_node_norm_constant():
    rng = np.random.default_rng(12)
    x0 = rng.normal(size=(1, 2, 3, 2))
    teacher = rng.normal(size=(1, 2, 3, 4))
    teacher_affinity = reference_affinity(teacher)
    const_norm = np.sqrt((x0.reshape(1, -1, 2) ** 2).sum(-1, keepdims=True)) + 1e-8

    def fd_gradient(loss_of_x):
        grad = np.zeros_like(x0)
        for idx in np.ndindex(x0.shape):
            up, down = x0.copy(), x0.copy()
            up[idx] += 1e-6
            down[idx] -= 1e-6
            grad[idx] = (loss_of_x(up) - loss_of_x(down)) / 2e-6
        return grad

    detached = fd_gradient(lambda x: _pairwise_loss_fixed_norm(x, const_norm, teacher_affinity))
    full = fd_gradient(lambda x: reference_pairwise(x, teacher, None))
    student = tf.Variable(x0.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = losses.pairwise_distillation_loss(student, teacher.astype(np.float32), None)
    grad = tape.gradient(loss, student).numpy()
    np.testing.assert_allclose(grad, detached, rtol=1e-3, atol=1e-6)
    assert np.abs(full - detached).max() > 1e-2  # the two conventions really differ here


def test_pairwise_loss_from_precomputed_teacher_nodes_equals_direct_loss():
    rng = np.random.default_rng(13)
    student = rng.normal(size=(2, 7, 9, 3)).astype(np.float32)
    teacher = rng.normal(size=(2, 7, 9, 5)).astype(np.float32)
    pool_size = losses.affinity_pool_size(7, 9, 0.5)
    from_nodes = losses.node_affinity_loss(
        losses.affinity_nodes(student, pool_size), losses.affinity_nodes(teacher, pool_size)
    )
    direct = losses.pairwise_distillation_loss(student, teacher, pool_scale=0.5)
    np.testing.assert_allclose(scalar(from_nodes), scalar(direct), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Graph modes


def test_losses_with_dynamic_shapes_in_tf_function_equal_eager():
    truth, pred = random_depth_pair((2, 7, 9, 1), seed=30)
    rng = np.random.default_rng(14)
    student = rng.normal(size=(2, 7, 9, 3)).astype(np.float32)
    teacher = rng.normal(size=(2, 7, 9, 5)).astype(np.float32)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None, 1]),
            tf.TensorSpec([None, None, None, 1]),
            tf.TensorSpec([None, None, None, 3]),
            tf.TensorSpec([None, None, None, 5]),
        ]
    )
    def all_losses(t, p, s, f):
        return (
            losses.scale_invariant_loss(t, p),
            losses.gradient_matching_loss(t, p),
            losses.pairwise_distillation_loss(s, f, pool_scale=1 / 3),
        )

    got = [scalar(v) for v in all_losses(truth, pred, student, teacher)]
    expected = [
        reference_si(truth, pred),
        reference_gml(truth, pred),
        reference_pairwise(student, teacher, 1 / 3),
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_losses_under_xla_equal_references():
    truth, pred = random_depth_pair((2, 7, 9, 1), seed=31)
    rng = np.random.default_rng(15)
    student = rng.normal(size=(2, 7, 9, 3)).astype(np.float32)
    teacher = rng.normal(size=(2, 7, 9, 5)).astype(np.float32)

    @tf.function(jit_compile=True)
    def all_losses(t, p, s, f):
        return (
            losses.scale_invariant_loss(t, p),
            losses.gradient_matching_loss(t, p),
            losses.pairwise_distillation_loss(s, f, pool_scale=0.5),
        )

    got = [scalar(v) for v in all_losses(truth, pred, student, teacher)]
    expected = [
        reference_si(truth, pred),
        reference_gml(truth, pred),
        reference_pairwise(student, teacher, 0.5),
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_default_loss_weights_are_spec_values():
    weights = (losses.DEFAULT_LAMBDA_SI, losses.DEFAULT_LAMBDA_GML, losses.DEFAULT_LAMBDA_D)
    assert weights == (1.0, 0.5, 1.0)


def test_node_affinity_loss_gives_teacher_nodes_no_gradient():
    rng = np.random.default_rng(16)
    student_nodes = tf.Variable(rng.normal(size=(2, 6, 3)).astype(np.float32))
    teacher_nodes = tf.Variable(rng.normal(size=(2, 6, 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = losses.node_affinity_loss(student_nodes, teacher_nodes)
    grad_student, grad_teacher = tape.gradient(loss, [student_nodes, teacher_nodes])
    assert grad_teacher is None or not np.any(grad_teacher.numpy())
    assert np.abs(grad_student.numpy()).max() > 1e-4


# ----------------------------------------------------------------------------------------------
# Variance focus (λ) and response distillation


def reference_si_focus(depth_true, depth_pred, variance_focus):
    total = 0.0
    for t, p in zip(depth_true[..., 0].astype(np.float64), depth_pred[..., 0].astype(np.float64)):
        valid = reference_valid(t)
        g = np.log(np.maximum(p[valid], MIN_DEPTH)) - np.log(t[valid])
        total += (g**2).mean() - variance_focus * g.mean() ** 2
    return total / len(depth_true)


def test_variance_focus_one_reproduces_the_scale_invariant_value():
    rng = np.random.default_rng(11)
    truth = rng.uniform(0.5, 30.0, (3, 6, 5, 1)).astype(np.float32)
    pred = rng.uniform(0.5, 30.0, (3, 6, 5, 1)).astype(np.float32)
    np.testing.assert_allclose(scalar(losses.scale_invariant_loss(truth, pred, variance_focus=1.0)),
                               reference_si(truth, pred), rtol=1e-5)


@pytest.mark.parametrize("variance_focus", [0.0, 0.5, 0.85])
def test_variance_focus_below_one_matches_numpy_reference(variance_focus):
    rng = np.random.default_rng(12)
    truth = rng.uniform(0.5, 30.0, (2, 5, 7, 1)).astype(np.float32)
    pred = rng.uniform(0.5, 30.0, (2, 5, 7, 1)).astype(np.float32)
    np.testing.assert_allclose(
        scalar(losses.scale_invariant_loss(truth, pred, variance_focus=variance_focus)),
        reference_si_focus(truth, pred, variance_focus), rtol=1e-5)


def test_variance_focus_below_one_penalises_a_scaled_prediction():
    truth = np.random.default_rng(13).uniform(0.5, 30.0, (2, 6, 5, 1)).astype(np.float32)
    exact = scalar(losses.scale_invariant_loss(truth, truth, variance_focus=0.85))
    scaled = scalar(losses.scale_invariant_loss(truth, 2.0 * truth, variance_focus=0.85))
    assert abs(exact) < 1e-10
    np.testing.assert_allclose(scaled, 0.15 * math.log(2.0) ** 2, rtol=1e-5)


@pytest.mark.parametrize("variance_focus", [-0.1, 1.5])
def test_variance_focus_outside_unit_interval_is_refused(variance_focus):
    truth = np.ones((1, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match=r"variance_focus.*\[0, 1\]"):
        losses.scale_invariant_loss(truth, truth, variance_focus=variance_focus)


def test_response_loss_is_zero_for_a_scaled_copy_of_the_teacher():
    teacher = np.random.default_rng(14).uniform(0.01, 60.0, (2, 6, 5, 1)).astype(np.float32)
    scale = np.array([0.4, 3.0], np.float32).reshape(2, 1, 1, 1)  # per image
    assert abs(scalar(losses.response_distillation_loss(teacher, scale * teacher))) < 1e-10


def test_response_loss_is_positive_for_another_depth_map():
    rng = np.random.default_rng(15)
    teacher = rng.uniform(0.5, 30.0, (2, 6, 5, 1)).astype(np.float32)
    student = rng.uniform(0.5, 30.0, (2, 6, 5, 1)).astype(np.float32)
    value = scalar(losses.response_distillation_loss(teacher, student))
    # every pixel counts, also beyond the 40 m truth cap: the plain SI loss of the pair, uncapped
    np.testing.assert_allclose(value, reference_si(teacher, student), rtol=1e-5)
    assert value > 0.1


def test_response_loss_uses_pixels_beyond_the_truth_cap_and_gives_the_teacher_no_gradient():
    teacher = tf.constant(np.full((1, 2, 2, 1), 80.0, np.float32) * [[[[1.0]], [[2.0]]]])
    student = tf.Variable(np.full((1, 2, 2, 1), 5.0, np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(teacher)
        value = losses.response_distillation_loss(teacher, student)
    assert scalar(value) > 0.01  # the teacher's 80/160 m pixels are targets
    assert tape.gradient(value, teacher) is None
    assert np.abs(tape.gradient(value, student).numpy()).sum() > 0
