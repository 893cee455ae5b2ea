"""Training wrappers: a depth network trained directly, and a student distilled from a frozen teacher.

``DepthTrainer(network)`` trains one network (teacher or student: the paper's "direct training") on
``λs·Ls + λgml·Lgml``; ``Distiller(teacher=..., student=...)`` adds ``λd·Σ_k Lpa(student_k, teacher_k)``
over the distilled stride pairs (SPEC §1). Both are ``keras.Model``s used through
``compile(optimizer=...)`` and ``fit(images, depths)``; the networks they wrap are functional models
with dict outputs ``depth, stride16, stride8, stride4, stride2`` (SPEC §4).

Under ``tf.distribute`` each replica's loss is divided by the number of replicas before the gradient
(Keras sums replica gradients; TOOLCHAIN §10), so one global batch gives the same update on 1 or N
replicas; the trackers report the unscaled values.
"""

import keras
import tensorflow as tf

from mdekd import losses
from mdekd.metrics import per_image_depth_metrics

DISTILL_STRIDES = ("stride16", "stride8", "stride4", "stride2")  # SPEC §4: the K <= 4 pairs
VALIDATION_METRICS = ("si_rmse", "rmse", "abs_rel")


def _num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


class DepthTrainer(keras.Model):
    """Trains ``network`` directly on ground truth with ``λs·Ls + λgml·Lgml``.

    Args:
        network: functional model, input (B, H, W, 3) RGB in [0, 1], dict output with ``depth``
            (B, H, W, 1) metres.
        lambda_si, lambda_gml: loss weights (SPEC §1 defaults 1 and 0.5).
        num_scales: scales of the gradient matching loss.
    """

    def __init__(self, network, lambda_si=losses.DEFAULT_LAMBDA_SI,
                 lambda_gml=losses.DEFAULT_LAMBDA_GML, num_scales=4, **kwargs):
        kwargs.setdefault("name", f"{network.name}_trainer")
        super().__init__(**kwargs)
        self.network = network
        self.lambda_si = float(lambda_si)
        self.lambda_gml = float(lambda_gml)
        self.num_scales = int(num_scales)
        self.loss_trackers = {
            name: keras.metrics.Mean(name=name) for name in self.loss_names
        }
        self.metric_trackers = {
            name: keras.metrics.Mean(name=name) for name in VALIDATION_METRICS
        }
        # TOOLCHAIN §10: without this, save_weights / BackupAndRestore refuse an "unbuilt" model.
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

    def loss_terms(self, depths, outputs, images):
        """Unweighted loss terms and their weighted sum ``loss``: dict of float32 scalars."""
        depth_pred = tf.cast(outputs["depth"], tf.float32)
        si = losses.scale_invariant_loss(depths, depth_pred)
        gml = losses.gradient_matching_loss(depths, depth_pred, num_scales=self.num_scales)
        return {
            "loss": self.lambda_si * si + self.lambda_gml * gml,
            "si_loss": si,
            "gml_loss": gml,
        }

    def prepare_step(self, images):
        """Work done outside the gradient tape before the student's forward pass (none here)."""
        return None

    def train_step(self, data):
        images, depths, _ = keras.utils.unpack_x_y_sample_weight(data)
        extra = self.prepare_step(images)
        variables = self.network.trainable_variables
        with tf.GradientTape() as tape:
            outputs = self.network(images, training=True)
            terms = self._terms(depths, outputs, images, extra)
            # TOOLCHAIN §10: Keras sums replica gradients, so each replica optimises loss / N.
            optimised = terms["loss"] / tf.cast(_num_replicas(), tf.float32)
            # TOOLCHAIN §12: a no-op in float32, required under mixed_float16.
            optimised = self.optimizer.scale_loss(optimised)
        gradients = tape.gradient(optimised, variables)
        self.optimizer.apply(gradients, variables)
        for name, value in terms.items():
            self.loss_trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.loss_trackers.items()}

    def test_step(self, data):
        images, depths, _ = keras.utils.unpack_x_y_sample_weight(data)
        extra = self.prepare_step(images)
        outputs = self.network(images, training=False)
        terms = self._terms(depths, outputs, images, extra)
        for name, value in terms.items():
            self.loss_trackers[name].update_state(value)
        values, has_valid = per_image_depth_metrics(depths, tf.cast(outputs["depth"], tf.float32))
        weight = tf.cast(has_valid, tf.float32)
        for name, tracker in self.metric_trackers.items():
            tracker.update_state(values[name], sample_weight=weight)
        return {tracker.name: tracker.result() for tracker in self.metrics}

    def _terms(self, depths, outputs, images, extra):
        return self.loss_terms(tf.cast(depths, tf.float32), outputs, images)


class Distiller(DepthTrainer):
    """Distils a frozen ``teacher`` into ``student`` (Wang et al. 2021; SPEC §1 total loss).

    The teacher runs in inference mode outside the gradient tape and is never updated; only the
    student's trainable variables receive gradients.

    Args:
        teacher, student: functional models with dict outputs ``depth`` and the ``strides`` maps,
            built for the same input size (their stride maps must share H×W).
        lambda_si, lambda_gml, lambda_d: loss weights (SPEC §1 defaults 1, 0.5, 1).
        strides: names of the distilled output pairs, a subset of ``DISTILL_STRIDES``.
        pool_scale: node grid of the pairwise loss (``None`` = every pixel is a node).
    """

    def __init__(self, teacher, student, lambda_si=losses.DEFAULT_LAMBDA_SI,
                 lambda_gml=losses.DEFAULT_LAMBDA_GML, lambda_d=losses.DEFAULT_LAMBDA_D,
                 strides=DISTILL_STRIDES, pool_scale=0.5, num_scales=4, **kwargs):
        self.strides = tuple(strides)
        if not self.strides:
            raise ValueError("Distiller needs at least one stride pair to distil; got strides=()")
        check_distillation_pair(teacher, student, self.strides)
        kwargs.setdefault("name", "distiller")
        super().__init__(student, lambda_si=lambda_si, lambda_gml=lambda_gml,
                         num_scales=num_scales, **kwargs)
        self.teacher = teacher
        self.teacher.trainable = False
        self.lambda_d = float(lambda_d)
        self.pool_scale = None if pool_scale is None else float(pool_scale)

    @property
    def student(self):
        return self.network

    @property
    def loss_names(self):
        return ("loss", "si_loss", "gml_loss", "distill_loss")

    def prepare_step(self, images):
        outputs = self.teacher(images, training=False)
        return {name: tf.stop_gradient(tf.cast(outputs[name], tf.float32)) for name in self.strides}

    def _terms(self, depths, outputs, images, teacher_features):
        terms = self.loss_terms(tf.cast(depths, tf.float32), outputs, images)
        distill = tf.add_n([
            losses.pairwise_distillation_loss(
                tf.cast(outputs[name], tf.float32), teacher_features[name],
                pool_scale=self.pool_scale)
            for name in self.strides
        ])
        terms["distill_loss"] = distill
        terms["loss"] = terms["loss"] + self.lambda_d * distill
        return terms


def check_distillation_pair(teacher, student, strides):
    """Raise ValueError unless teacher and student can be distilled over ``strides``.

    Both must take the same input size and output every stride map with the same H×W.
    """
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
