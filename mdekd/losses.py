"""Training losses for monocular depth distillation (design.md §1).

Depth tensors are (B, H, W, 1) float32 in metres, 0 = invalid; feature maps are NHWC. Every loss
returns a float32 scalar that is finite for any input with finite values: images or batches with
no valid pixel contribute 0, predictions are clamped to at least ``min_depth`` before any log,
and the log of the truth is taken only where it is valid (select, never ``inf * 0``).

All functions are plain TensorFlow ops: they run eagerly, inside ``tf.function`` (with or
without ``jit_compile``) and under ``tf.distribute``, with a static or dynamic batch size.
They return the *per-replica* value: a caller optimising under a distribution strategy scales
it by ``1 / num_replicas_in_sync`` itself (toolchain.md §10).

The total distillation objective is
``DEFAULT_LAMBDA_SI * L_si + DEFAULT_LAMBDA_GML * L_gml + DEFAULT_LAMBDA_D * Σ_k L_pa(s_k, t_k)``.
"""

import keras
import tensorflow as tf

from mdekd.constants import MAX_DEPTH, MIN_DEPTH, valid_depth

# design.md §1: the paper does not publish its λ; these defaults are ours (CLI flags override them).
DEFAULT_LAMBDA_SI = 1.0
DEFAULT_LAMBDA_GML = 0.5
DEFAULT_LAMBDA_D = 1.0

# docs/design.md §1: λ < 1 keeps the depth scale, so trained networks predict metres (BTS's value).
METRIC_VARIANCE_FOCUS = 0.85

DEFAULT_GML_SCALES = 4  # design.md §1; MiDaS reference GradientLoss(scales=4)
DEFAULT_POOL_SCALE = 0.5  # design.md §1; Liu et al. 2019 reference, pairwise loss after pooling
NORM_EPSILON = 1e-8  # design.md §1; added to each node's L2 norm, as in the reference L2()


def valid_mask(depth_true, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH, dtype=tf.float32):
    """Where the ground truth is valid: ``min_depth < d`` and ``d <= max_depth`` (design.md preamble).

    depth_true: (B, H, W, 1) metres, 0 = invalid. ``max_depth=None`` sets no upper cap; non-finite
    values are never valid (an infinite truth would make every log loss infinite).
    Returns a tensor of the same shape, ``dtype`` float32 (1/0) by default or ``tf.bool``.
    """
    mask = valid_depth(tf.cast(depth_true, tf.float32), min_depth, max_depth)
    return mask if dtype == tf.bool else tf.cast(mask, dtype)


def _masked_log_ratio(depth_true, depth_pred, min_depth, max_depth):
    """(g, mask): g = ln(max(pred, min_depth)) - ln(true) where valid, else 0; mask float32."""
    depth_true = tf.cast(depth_true, tf.float32)
    depth_pred = tf.cast(depth_pred, tf.float32)
    is_valid = valid_mask(depth_true, min_depth, max_depth, dtype=tf.bool)
    # Select a harmless 1 m before the log so that no inf/NaN exists even in the unused branch
    # (tf.where back-propagates into both branches).
    safe_true = tf.where(is_valid, depth_true, tf.ones_like(depth_true))
    log_ratio = tf.math.log(tf.maximum(depth_pred, min_depth)) - tf.math.log(safe_true)
    log_ratio = tf.where(is_valid, log_ratio, tf.zeros_like(log_ratio))
    return log_ratio, tf.cast(is_valid, tf.float32)


def _batch_size(tensor):
    return tf.cast(tf.shape(tensor)[0], tf.float32)


def check_variance_focus(variance_focus, flag="variance_focus"):
    """``variance_focus`` as a float, or ValueError naming ``flag`` unless it lies in [0, 1]."""
    value = float(variance_focus)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{flag}: the variance-focus weight λ must lie in [0, 1], found {variance_focus}")
    return value


def scale_invariant_loss(depth_true, depth_pred, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH,
                         variance_focus=1.0):
    """Scale-invariant log loss with variance focus λ (Eigen et al. 2014; docs/design.md §1).

    Per image over its n valid pixels, with g = ln(pred) - ln(true):
    ``L_img = (1/n) Σ g² - λ (1/n²) (Σ g)²``; returns the mean of ``L_img`` over the B images of
    the batch, an image without valid pixels counting as 0 in that mean. λ = 1 (default) is the
    fully scale-invariant form (the si-RMSE squared); λ < 1 also penalises a global scale error
    (BTS uses 0.85), so a network trained with it predicts metres.
    depth_true, depth_pred: (B, H, W, 1) metres. Returns a float32 scalar.
    """
    variance_focus = check_variance_focus(variance_focus)
    log_ratio, mask = _masked_log_ratio(depth_true, depth_pred, min_depth, max_depth)
    count = tf.reduce_sum(mask, axis=[1, 2, 3])
    mean = tf.math.divide_no_nan(tf.reduce_sum(log_ratio, axis=[1, 2, 3]), count)
    # The centred form (1/n) Σ (g - mean)² equals the design.md §1 formula (value and gradient) but does
    # not lose precision when g has a large common offset (a prediction off by a scale factor).
    centred = (log_ratio - mean[:, None, None, None]) * mask
    per_image = tf.math.divide_no_nan(tf.reduce_sum(tf.square(centred), axis=[1, 2, 3]), count)
    if variance_focus != 1.0:
        # (1/n) Σ g² - λ mean² = (1/n) Σ (g - mean)² + (1 - λ) mean²
        per_image += (1.0 - variance_focus) * tf.square(mean)
    return tf.math.divide_no_nan(tf.reduce_sum(per_image), _batch_size(log_ratio))


def response_distillation_loss(teacher_depth, student_depth, variance_focus=1.0):
    """Response distillation (ours; docs/design.md §1): the SI loss of the student's depth against
    the teacher's, over every pixel (labelled or not), the teacher side without gradient.

    teacher_depth, student_depth: (B, H, W, 1) metres > 0 (both networks end in softplus + MIN_DEPTH,
    so every teacher pixel is a target; there is no depth cap). Returns a float32 scalar; at λ = 1 it is
    0 exactly when the student's depth is the teacher's times a per-image constant.
    """
    teacher_depth = tf.stop_gradient(tf.cast(teacher_depth, tf.float32))
    # Half of MIN_DEPTH: the teacher's floor (softplus + MIN_DEPTH) must still count as valid.
    return scale_invariant_loss(teacher_depth, student_depth, min_depth=0.5 * MIN_DEPTH,
                                max_depth=None, variance_focus=variance_focus)


def gradient_matching_loss(
    depth_true,
    depth_pred,
    num_scales=DEFAULT_GML_SCALES,
    min_depth=MIN_DEPTH,
    max_depth=MAX_DEPTH,
):
    """Multi-scale gradient matching loss on log depth (Ranftl et al. 2019; design.md §1).

    R = mask · (ln pred - ln true). For scale k = 0..num_scales-1, every 2^k-th pixel of R and of
    the mask is kept (``x[:, ::s, ::s]``, no pooling); the absolute forward differences of R along
    W and along H count where both neighbours are valid; the scale's term is their sum over the
    batch divided by the number of valid pixels of the batch at that scale (0 if none), as in the
    MiDaS reference with batch-based reduction. Returns the sum of the terms, a float32 scalar.
    depth_true, depth_pred: (B, H, W, 1) metres.
    """
    if num_scales < 1:
        raise ValueError(f"gradient_matching_loss: num_scales must be >= 1, found {num_scales}")
    residual, mask = _masked_log_ratio(depth_true, depth_pred, min_depth, max_depth)
    total = tf.constant(0.0, tf.float32)
    for scale in range(num_scales):
        step = 2**scale
        r = residual[:, ::step, ::step, :]
        m = mask[:, ::step, ::step, :]
        grad_w = tf.abs(r[:, :, 1:] - r[:, :, :-1]) * (m[:, :, 1:] * m[:, :, :-1])
        grad_h = tf.abs(r[:, 1:] - r[:, :-1]) * (m[:, 1:] * m[:, :-1])
        total += tf.math.divide_no_nan(
            tf.reduce_sum(grad_w) + tf.reduce_sum(grad_h), tf.reduce_sum(m)
        )
    return total


def affinity_pool_size(height, width, pool_scale=DEFAULT_POOL_SCALE):
    """Max-pool kernel (= stride) ``(int(H·pool_scale), int(W·pool_scale))``, each at least 1.

    height, width: Python ints or scalar int tensors (the teacher map's). ``pool_scale=None``
    returns None (no pooling). design.md §1.
    """
    if pool_scale is None:
        return None
    if not pool_scale > 0:
        raise ValueError(f"pool_scale must be > 0 or None, found {pool_scale}")
    if isinstance(height, int) and isinstance(width, int):
        return max(int(height * pool_scale), 1), max(int(width * pool_scale), 1)

    def size(n):  # int() truncates toward zero; n * pool_scale >= 0 here, so floor is the same
        pooled = tf.cast(tf.math.floor(tf.cast(n, tf.float64) * pool_scale), tf.int32)
        return tf.maximum(pooled, 1)

    return size(height), size(width)


def _ceil_max_pool(features, pool_size):
    """Max pool with kernel = stride = pool_size, keeping partial windows (ceil mode).

    The map is padded at the bottom/right with -inf to a multiple of the kernel, then pooled
    without padding. Every window starts inside the map, so each holds at least one real value
    and -inf never reaches the output. features: (B, H, W, C) -> (B, ceil(H/kh), ceil(W/kw), C).
    """
    kh, kw = pool_size
    height, width = features.shape[1], features.shape[2]
    if height is None or width is None:
        height, width = tf.shape(features)[1], tf.shape(features)[2]
    pad_h = (-height) % kh
    pad_w = (-width) % kw
    padded = tf.pad(
        features,
        [[0, 0], [0, pad_h], [0, pad_w], [0, 0]],
        constant_values=float("-inf"),
    )
    if isinstance(kh, int) and isinstance(kw, int):
        return tf.nn.max_pool2d(padded, ksize=(kh, kw), strides=(kh, kw), padding="VALID")
    # Kernel known only at run time (H or W dynamic): windows as a reshape, then a max.
    shape = tf.shape(padded)
    blocks = tf.reshape(
        padded, [shape[0], shape[1] // kh, kh, shape[2] // kw, kw, shape[3]]
    )
    return tf.reduce_max(blocks, axis=[2, 4])


def affinity_nodes(features, pool_size=None):
    """Graph nodes of a feature map: pooled, L2-normalised channel vectors (design.md §1).

    features: (B, H, W, C). pool_size: (kh, kw) from ``affinity_pool_size`` or None (no pooling).
    Each node vector is divided by (its L2 norm + 1e-8), the norm held constant for gradients
    (the reference detaches it). Returns (B, N, C) float32, N = ceil(H/kh)·ceil(W/kw).
    Teacher nodes can be computed once and passed to ``node_affinity_loss``.
    """
    features = tf.cast(features, tf.float32)
    if pool_size is not None:
        features = _ceil_max_pool(features, pool_size)
    norm = tf.sqrt(tf.reduce_sum(tf.square(features), axis=-1, keepdims=True)) + NORM_EPSILON
    normalised = features / tf.stop_gradient(norm)
    shape = tf.shape(normalised)
    return tf.reshape(normalised, [shape[0], shape[1] * shape[2], shape[3]])


def node_affinity_loss(student_nodes, teacher_nodes):
    """Σ (A_s - A_t)² / N² / B with A = F̂ F̂ᵀ per image; nodes (B, N, C_s) and (B, N, C_t).

    The teacher side carries no gradient. Returns a float32 scalar. design.md §1.
    """
    teacher_nodes = tf.stop_gradient(tf.cast(teacher_nodes, tf.float32))
    student_nodes = tf.cast(student_nodes, tf.float32)
    affinity_s = tf.linalg.matmul(student_nodes, student_nodes, transpose_b=True)
    affinity_t = tf.linalg.matmul(teacher_nodes, teacher_nodes, transpose_b=True)
    num_nodes = tf.cast(tf.shape(teacher_nodes)[1], tf.float32)
    squared = tf.reduce_sum(tf.square(affinity_s - affinity_t))
    return tf.math.divide_no_nan(squared / tf.square(num_nodes), _batch_size(teacher_nodes))


def _check_matching_maps(student_features, teacher_features):
    s_shape, t_shape = student_features.shape, teacher_features.shape
    if any(shape.rank is not None and shape.rank != 4 for shape in (s_shape, t_shape)):
        raise ValueError(
            "pairwise_distillation_loss expects NHWC maps (B, H, W, C), found student "
            f"{s_shape} and teacher {t_shape}"
        )
    if s_shape.rank is None or t_shape.rank is None:
        return
    for axis, name in ((0, "batch"), (1, "height"), (2, "width")):
        s_dim, t_dim = s_shape[axis], t_shape[axis]
        if s_dim is not None and t_dim is not None and s_dim != t_dim:
            raise ValueError(
                f"pairwise_distillation_loss: student and teacher maps must have the same {name}, "
                f"found student {s_shape} and teacher {t_shape}"
            )


def pairwise_distillation_loss(student_features, teacher_features, pool_scale=DEFAULT_POOL_SCALE):
    """Pairwise (affinity) distillation loss (Liu et al. 2019, reference semantics; design.md §1).

    student_features (B, H, W, C_s) and teacher_features (B, H, W, C_t): same H and W, channel
    counts may differ. Both maps are max-pooled with kernel = stride =
    ``(int(H·pool_scale), int(W·pool_scale))`` of the teacher map, partial windows kept (ceil
    mode); ``pool_scale=None`` pools nothing. Returns Σ (A_s - A_t)² / N² / B, a float32 scalar;
    gradients reach the student only.
    """
    teacher_features = tf.convert_to_tensor(teacher_features)
    student_features = tf.convert_to_tensor(student_features)
    _check_matching_maps(student_features, teacher_features)
    height, width = teacher_features.shape[1], teacher_features.shape[2]
    if height is None or width is None:
        height, width = tf.shape(teacher_features)[1], tf.shape(teacher_features)[2]
    pool_size = affinity_pool_size(height, width, pool_scale)
    return node_affinity_loss(
        affinity_nodes(student_features, pool_size),
        affinity_nodes(tf.stop_gradient(teacher_features), pool_size),
    )


class PairwiseAffinityDistillation(keras.distillation.DistillationLoss):
    """The pairwise loss as a ``keras.distillation.DistillationLoss`` (design.md §1).

    For users of ``keras.distillation.Distiller``: it compares the output of ``teacher_layer_name``
    in the teacher with that of ``student_layer_name`` in the student (maps of the same H×W).
    Keras' Distiller requires teacher and student outputs of one shape, so give it the depth-only
    graphs (``mdekd.models.inference_model``); ``feature_layer_names`` gives the layers behind the
    ``stride*`` outputs. Our ``mdekd.distill.Distiller`` adds the SI + gradient matching objective,
    cached targets, response distillation and multi-replica scaling.
    """

    def __init__(self, teacher_layer_name, student_layer_name, pool_scale=DEFAULT_POOL_SCALE):
        self.teacher_layer_name = teacher_layer_name
        self.student_layer_name = student_layer_name
        self.pool_scale = pool_scale

    def validate_model_compatibility(self, teacher, student):
        shapes = {}
        for role, model, name in (("teacher", teacher, self.teacher_layer_name),
                                  ("student", student, self.student_layer_name)):
            try:
                shapes[role] = tuple(model.get_layer(name).output.shape[1:3])
            except ValueError as error:
                raise ValueError(f"PairwiseAffinityDistillation: {role} '{model.name}' has no layer "
                                 f"'{name}' ({error})") from None
        if shapes["teacher"] != shapes["student"]:
            raise ValueError(f"PairwiseAffinityDistillation: teacher layer '{self.teacher_layer_name}' "
                             f"is {shapes['teacher']} but student layer '{self.student_layer_name}' is "
                             f"{shapes['student']} (H×W must match)")

    def validate_outputs(self, teacher_outputs, student_outputs):
        pass  # channel counts may differ; H×W is checked in validate_model_compatibility

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return pairwise_distillation_loss(student_outputs, teacher_outputs, self.pool_scale)

    def get_config(self):
        return {"teacher_layer_name": self.teacher_layer_name,
                "student_layer_name": self.student_layer_name, "pool_scale": self.pool_scale}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def feature_layer_names(model):
    """Name of the layer behind each ``stride*`` output of a student or teacher: dict key -> name."""
    return {key: tensor._keras_history.operation.name for key, tensor in model.output.items()
            if key.startswith("stride")}
