"""Training wrappers: a depth network trained directly, and a student distilled from a frozen teacher.

``DepthTrainer(network)`` trains one network (teacher or student: the paper's "direct training") on
``λs·Ls + λgml·Lgml``; ``Distiller(teacher=..., student=...)`` adds ``λd·Σ_k Lpa(student_k, teacher_k)``
over the distilled stride pairs (design.md §1). Both are ``keras.Model``s used through
``compile(optimizer=...)`` and ``fit(images, depths)``; the networks they wrap are functional models
with dict outputs ``depth, stride16, stride8, stride4, stride2`` (design.md §4).

Under ``tf.distribute`` each replica's loss is divided by the number of replicas before the gradient
(Keras sums replica gradients; toolchain.md §10), so one global batch gives the same update on 1 or N
replicas; the trackers report the unscaled values.
"""

import keras
import numpy as np
import tensorflow as tf

from mdekd import losses
from mdekd.metrics import per_image_depth_metrics
from mdekd.models.common import FEATURE_KEYS

DISTILL_STRIDES = FEATURE_KEYS  # design.md §4: the K <= 4 pairs are the decoder maps
VALIDATION_METRICS = ("si_rmse", "rmse", "abs_rel")
FEATURE_ACTIVATIONS = (None, "relu")
TEACHER_DEPTH = "teacher_depth"  # key of the precomputed teacher depth in a batch


def _num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


class DepthTrainer(keras.Model):
    """Trains ``network`` directly on ground truth with ``λs·Ls + λgml·Lgml``.

    Args:
        network: functional model, input (B, H, W, 3) RGB in [0, 1], dict output with ``depth``
            (B, H, W, 1) metres.
        lambda_si, lambda_gml: loss weights (design.md §1 defaults 1 and 0.5).
        num_scales: scales of the gradient matching loss.
    """

    def __init__(self, network, lambda_si=losses.DEFAULT_LAMBDA_SI,
                 lambda_gml=losses.DEFAULT_LAMBDA_GML, num_scales=losses.DEFAULT_GML_SCALES,
                 variance_focus=1.0, **kwargs):
        kwargs.setdefault("name", f"{network.name}_trainer")
        super().__init__(**kwargs)
        self.network = network
        self.lambda_si = float(lambda_si)
        self.lambda_gml = float(lambda_gml)
        self.num_scales = int(num_scales)
        self.variance_focus = losses.check_variance_focus(variance_focus)
        self.loss_trackers = {
            name: keras.metrics.Mean(name=name) for name in self.loss_names
        }
        self.metric_trackers = {
            name: keras.metrics.Mean(name=name) for name in VALIDATION_METRICS
        }
        # toolchain.md §10: without this, save_weights / BackupAndRestore refuse an "unbuilt" model.
        self.built = True

    @property
    def loss_names(self):
        return ("loss", "si_loss", "gml_loss")

    @property
    def metrics(self):
        return list(self.loss_trackers.values()) + list(self.metric_trackers.values())

    def call(self, images, training=False):
        """Depth (B, H, W, 1) metres of the trained network."""
        return self.network(images, training=training)["depth"]

    def loss_terms(self, depths, outputs):
        """Unweighted loss terms and their weighted sum ``loss``: dict of float32 scalars.

        The SI term is averaged over the images that have labels: unlabelled frames (depth all 0,
        ``--unlabeled_dir``) neither dilute it nor receive a supervised gradient. For batches whose
        every image has a valid pixel this is the design.md §1 value exactly.
        """
        depth_pred = tf.cast(outputs["depth"], tf.float32)
        si = losses.scale_invariant_loss(depths, depth_pred, variance_focus=self.variance_focus)
        labelled = tf.reduce_sum(tf.cast(tf.reduce_any(
            losses.valid_mask(depths, dtype=tf.bool), axis=[1, 2, 3]), tf.float32))
        batch = tf.cast(tf.shape(depths)[0], tf.float32)
        si = si * tf.math.divide_no_nan(batch, labelled)
        gml = losses.gradient_matching_loss(depths, depth_pred, num_scales=self.num_scales)
        return {
            "loss": self.lambda_si * si + self.lambda_gml * gml,
            "si_loss": si,
            "gml_loss": gml,
        }

    def prepare_step(self, inputs):
        """(images, targets) from a batch's inputs, outside the gradient tape (no targets here)."""
        return inputs, None

    def train_step(self, data):
        inputs, depths, _ = keras.utils.unpack_x_y_sample_weight(data)
        images, targets = self.prepare_step(inputs)
        variables = self.network.trainable_variables
        with tf.GradientTape() as tape:
            outputs = self.network(images, training=True)
            terms = self._terms(depths, outputs, targets)
            # toolchain.md §10: Keras sums replica gradients, so each replica optimises loss / N.
            optimised = terms["loss"] / tf.cast(_num_replicas(), tf.float32)
            # toolchain.md §12: a no-op in float32, required under mixed_float16.
            optimised = self.optimizer.scale_loss(optimised)
        gradients = tape.gradient(optimised, variables)
        self.optimizer.apply(gradients, variables)
        for name, value in terms.items():
            self.loss_trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.loss_trackers.items()}

    def test_step(self, data):
        inputs, depths, _ = keras.utils.unpack_x_y_sample_weight(data)
        images, targets = self.prepare_step(inputs)
        outputs = self.network(images, training=False)
        terms = self._terms(depths, outputs, targets)
        for name, value in terms.items():
            self.loss_trackers[name].update_state(value)
        values, has_valid = per_image_depth_metrics(depths, tf.cast(outputs["depth"], tf.float32))
        weight = tf.cast(has_valid, tf.float32)
        for name, tracker in self.metric_trackers.items():
            tracker.update_state(values[name], sample_weight=weight)
        return {tracker.name: tracker.result() for tracker in self.metrics}

    def _terms(self, depths, outputs, targets):
        return self.loss_terms(tf.cast(depths, tf.float32), outputs)


class Distiller(DepthTrainer):
    """Distils a frozen ``teacher`` into ``student`` (Wang et al. 2021; docs/design.md §1 total loss).

    The teacher runs in inference mode outside the gradient tape and is never updated; only the
    student's trainable variables receive gradients. The loss is
    ``λs·Ls + λgml·Lgml + λd·Σ_k Lpa(student_k, teacher_k) + λr·Ls(teacher depth, student depth)``.

    Batches are ``(images, depths)``, or ``({"image": images, **targets}, depths)`` with the teacher's
    targets precomputed by ``compute_teacher_targets`` (toolchain.md §18: valid when the augmentation
    does not change what the teacher sees); then ``teacher`` may be None. Unlabelled frames carry
    depth 0: the supervised terms ignore them, every distillation term applies.

    Use this class for the paper's objective (it owns SI + GML, target caching and distribution);
    ``keras.distillation.Distiller`` with ``losses.PairwiseAffinityDistillation`` suits users already
    on that API.

    Args:
        teacher, student: functional models with dict outputs ``depth`` and the ``strides`` maps,
            built for the same input size (their stride maps must share H×W).
        lambda_si, lambda_gml, lambda_d, lambda_response: loss weights (defaults 1, 0.5, 1, 0).
        strides: names of the distilled output pairs, a subset of ``DISTILL_STRIDES`` (unused
            when ``lambda_d`` is 0).
        pool_scale: node grid of the pairwise loss: one value for every stride (``None`` = every
            cell a node; 0.5 = the paper's 2×2 nodes) or a mapping stride -> value.
        feature_activation: None (the maps as the networks output them, the paper) or ``"relu"``
            (both maps compared after a ReLU: the teacher's ``stride16`` is a pre-activation conv
            output while every student map is post-ReLU; docs/design.md §4).
        variance_focus: λ of the SI loss (1 = scale-invariant), also used by the response term.
    """

    def __init__(self, teacher, student, lambda_si=losses.DEFAULT_LAMBDA_SI,
                 lambda_gml=losses.DEFAULT_LAMBDA_GML, lambda_d=losses.DEFAULT_LAMBDA_D,
                 strides=DISTILL_STRIDES, pool_scale=losses.DEFAULT_POOL_SCALE,
                 feature_activation=None, lambda_response=0.0,
                 num_scales=losses.DEFAULT_GML_SCALES, variance_focus=1.0, **kwargs):
        self.lambda_d = float(lambda_d)
        self.lambda_response = float(lambda_response)
        self.strides = tuple(strides) if self.lambda_d else ()
        if self.lambda_d and not self.strides:
            raise ValueError("Distiller needs at least one stride pair to distil; got strides=()")
        if not self.strides and not self.lambda_response:
            raise ValueError("Distiller has nothing to distil: lambda_d and lambda_response are both 0")
        if feature_activation not in FEATURE_ACTIVATIONS:
            raise ValueError(f"feature_activation must be one of {FEATURE_ACTIVATIONS}, "
                             f"got {feature_activation!r}")
        self.feature_activation = feature_activation
        check_distillation_pair(teacher, student, self.strides)
        kwargs.setdefault("name", "distiller")
        super().__init__(student, lambda_si=lambda_si, lambda_gml=lambda_gml,
                         num_scales=num_scales, variance_focus=variance_focus, **kwargs)
        self.teacher = teacher
        if teacher is not None:
            self.teacher.trainable = False
        self.pool_scales = node_grid(pool_scale, self.strides)
        # The kernel comes from the teacher map, whose H×W equals the student's (design.md §1).
        self.pool_sizes = {
            name: losses.affinity_pool_size(*student.output[name].shape[1:3], self.pool_scales[name])
            for name in self.strides
        }

    @property
    def student(self):
        return self.network

    @property
    def loss_names(self):
        return ("loss", "si_loss", "gml_loss", "distill_loss", "response_loss")

    @property
    def target_names(self):
        """Keys of the teacher targets a batch may carry: the strides, and ``teacher_depth``."""
        return self.strides + ((TEACHER_DEPTH,) if self.lambda_response else ())

    def nodes(self, outputs, name):
        """Graph nodes (B, N, C) of one distilled map of a network's ``outputs``."""
        features = outputs[name]
        if self.feature_activation == "relu":
            features = tf.nn.relu(features)
        return losses.affinity_nodes(features, self.pool_sizes[name])

    def teacher_targets(self, images):
        """Teacher targets: nodes (B, N, C_t) per distilled stride and, with a response term,
        ``teacher_depth`` (B, H, W, 1) metres; float32, no gradient."""
        outputs = self.teacher(images, training=False)
        targets = {name: self.nodes(outputs, name) for name in self.strides}
        if self.lambda_response:
            targets[TEACHER_DEPTH] = tf.cast(outputs["depth"], tf.float32)
        return {name: tf.stop_gradient(value) for name, value in targets.items()}

    def prepare_step(self, inputs):
        if isinstance(inputs, dict):
            return inputs["image"], {name: inputs[name] for name in self.target_names}
        if self.teacher is None:
            raise ValueError("Distiller without a teacher needs precomputed targets in the batch")
        return inputs, self.teacher_targets(inputs)

    def _terms(self, depths, outputs, targets):
        terms = self.loss_terms(tf.cast(depths, tf.float32), outputs)
        zero = tf.constant(0.0, tf.float32)
        terms["distill_loss"] = tf.add_n([
            losses.node_affinity_loss(self.nodes(outputs, name), targets[name])
            for name in self.strides
        ]) if self.strides else zero
        terms["response_loss"] = losses.response_distillation_loss(
            targets[TEACHER_DEPTH], outputs["depth"], self.variance_focus
        ) if self.lambda_response else zero
        terms["loss"] = (terms["loss"] + self.lambda_d * terms["distill_loss"]
                         + self.lambda_response * terms["response_loss"])
        return terms


def node_grid(pool_scale, strides):
    """Per-stride pool scales from one value (float or None) or a mapping stride -> value."""
    if isinstance(pool_scale, dict):
        missing = [name for name in strides if name not in pool_scale]
        if missing:
            raise ValueError(f"pool_scale has no value for stride(s) {missing}; got {pool_scale}")
        return {name: pool_scale[name] for name in strides}
    return {name: pool_scale for name in strides}


def compute_teacher_targets(distiller, images, batch_size=16):
    """Precompute the teacher's targets for ``images`` (N, H, W, 3): dict stride → (N, nodes, C_t),
    plus ``teacher_depth`` (N, H, W, 1) with a response term.

    Feed them back as ``({"image": images, **targets}, depths)`` to skip the teacher's forward pass
    in every distillation step.
    """
    return teacher_targets_of_batches(
        distiller, (images[start:start + batch_size] for start in range(0, len(images), batch_size)))


def teacher_targets_of_batches(distiller, batches):
    """``Distiller.teacher_targets`` of each image batch (B, H, W, 3) of ``batches``, concatenated
    along the frames in order: dict target name -> numpy array (N, ...)."""
    chunks = {name: [] for name in distiller.target_names}
    step = tf.function(distiller.teacher_targets)
    for images in batches:
        for name, value in step(tf.convert_to_tensor(images)).items():
            chunks[name].append(value.numpy())
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def check_distillation_pair(teacher, student, strides):
    """Raise ValueError unless teacher and student can be distilled over ``strides``.

    Both must take the same input size and output every stride map with the same H×W.
    """
    if teacher is None:  # precomputed targets: only the student's outputs can be checked
        teacher = student
    t_shape, s_shape = tuple(teacher.input_shape[1:3]), tuple(student.input_shape[1:3])
    if t_shape != s_shape:
        raise ValueError(
            f"teacher '{teacher.name}' takes input H×W {t_shape} but student '{student.name}' takes "
            f"{s_shape}; build or load the teacher at the student's input size")
    for role, model in (("teacher", teacher), ("student", student)):
        outputs = model.output
        names = sorted(outputs) if isinstance(outputs, dict) else []
        missing = [s for s in ("depth", *strides) if s not in names]
        if missing:
            raise ValueError(f"{role} '{model.name}' has no output(s) {missing}; outputs are {names}")
    for name in strides:
        t = tuple(teacher.output[name].shape[1:3])
        s = tuple(student.output[name].shape[1:3])
        if t != s:
            raise ValueError(f"output '{name}': teacher H×W {t} differs from student H×W {s}")
