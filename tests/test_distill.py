"""Distiller / DepthTrainer: the training step of the paper (SPEC §1 total loss, frozen teacher)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdekd import losses
from mdekd.distill import (DepthTrainer, Distiller, check_distillation_pair,
                           compute_teacher_targets)
from mdekd.models import build_student, build_teacher

SIZE = (64, 64)


def tiny_student(seed=0, size=SIZE):
    keras.utils.set_random_seed(seed)
    return build_student((*size, 3), alpha=0.25)


def tiny_teacher(seed=1, size=SIZE):
    keras.utils.set_random_seed(seed)
    return build_teacher((*size, 3), encoder="resnest14", decoder_channels=16)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    # A learnable fixed batch: depth is a smooth function of the image content.
    images = rng.uniform(0, 1, (4, *SIZE, 3)).astype(np.float32)
    images[..., 0] = np.linspace(0, 1, SIZE[0])[None, :, None]
    depths = (2.0 + 8.0 * images[..., :1]).astype(np.float32)
    depths[:, :4] = 0.0  # some invalid pixels
    return images, depths


def train_losses(trainer, batch, steps=8, learning_rate=2e-3):
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate))
    images, depths = batch
    return [float(trainer.train_on_batch(images, depths, return_dict=True)["loss"])
            for _ in range(steps)]


def test_direct_student_training_reduces_loss(batch):
    history = train_losses(DepthTrainer(tiny_student()), batch)
    assert history[-1] < 0.8 * history[0]


def test_direct_teacher_training_reduces_loss(batch):
    history = train_losses(DepthTrainer(tiny_teacher()), batch)
    assert history[-1] < 0.8 * history[0]


def test_distillation_reduces_loss(batch):
    history = train_losses(Distiller(teacher=tiny_teacher(), student=tiny_student()), batch)
    assert history[-1] < 0.8 * history[0]


def test_teacher_weights_unchanged_by_distillation(batch):
    teacher, student = tiny_teacher(), tiny_student()
    before_teacher = [w.copy() for w in teacher.get_weights()]  # includes BN moving statistics
    before_student = [v.numpy().copy() for v in student.trainable_weights]
    train_losses(Distiller(teacher=teacher, student=student), batch, steps=3)
    for before, after in zip(before_teacher, teacher.get_weights()):
        np.testing.assert_array_equal(before, after)
    changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before_student, student.trainable_weights)]
    assert all(changed)


def test_no_gradient_reaches_the_teacher(batch):
    teacher, student = tiny_teacher(), tiny_student()
    distiller = Distiller(teacher=teacher, student=student)
    images, depths = batch
    with tf.GradientTape(persistent=True) as tape:
        _, targets = distiller.prepare_step(images)
        outputs = student(images, training=True)
        total = distiller._terms(tf.constant(depths), outputs, targets)["loss"]
    teacher_grads = tape.gradient(total, teacher.trainable_variables)
    student_grads = tape.gradient(total, student.trainable_variables)
    assert all(g is None for g in teacher_grads)
    assert all(g is not None for g in student_grads)
    assert not teacher.trainable_variables or teacher.trainable is False
    assert {id(v) for v in distiller.trainable_variables}.isdisjoint(
        {id(v) for v in teacher.variables})


def test_total_loss_is_the_weighted_sum_of_spec_terms(batch):
    teacher, student = tiny_teacher(), tiny_student()
    distiller = Distiller(teacher=teacher, student=student, lambda_si=0.7, lambda_gml=0.3,
                          lambda_d=2.0, strides=("stride8", "stride4"), pool_scale=0.25)
    images, depths = batch
    t_out = teacher(images, training=False)
    s_out = student(images, training=False)
    terms = distiller._terms(tf.constant(depths), s_out, distiller.prepare_step(images)[1])
    si = losses.scale_invariant_loss(depths, s_out["depth"])
    gml = losses.gradient_matching_loss(depths, s_out["depth"])
    pa = sum(losses.pairwise_distillation_loss(s_out[k], t_out[k], pool_scale=0.25)
             for k in ("stride8", "stride4"))
    np.testing.assert_allclose(float(terms["si_loss"]), float(si), rtol=1e-6)
    np.testing.assert_allclose(float(terms["gml_loss"]), float(gml), rtol=1e-6)
    np.testing.assert_allclose(float(terms["distill_loss"]), float(pa), rtol=1e-5)
    np.testing.assert_allclose(float(terms["loss"]), 0.7 * si + 0.3 * gml + 2.0 * pa, rtol=1e-5)


def test_validation_reports_loss_terms_and_depth_metrics(batch):
    distiller = Distiller(teacher=tiny_teacher(), student=tiny_student())
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
    logs = distiller.evaluate(*batch, batch_size=2, return_dict=True, verbose=0)
    for key in ("loss", "si_loss", "gml_loss", "distill_loss", "si_rmse", "rmse", "abs_rel"):
        assert np.isfinite(logs[key]), key
    assert logs["si_rmse"] == pytest.approx(np.sqrt(logs["si_loss"]), rel=0.3)


def test_distiller_rejects_teacher_of_another_input_size():
    with pytest.raises(ValueError, match="input H×W"):
        Distiller(teacher=tiny_teacher(size=(96, 64)), student=tiny_student())


def test_distiller_rejects_unknown_stride():
    with pytest.raises(ValueError, match="stride3"):
        check_distillation_pair(tiny_teacher(), tiny_student(), ("stride3",))


def test_precomputed_teacher_targets_give_the_same_loss(batch):
    teacher, student = tiny_teacher(), tiny_student()
    distiller = Distiller(teacher=teacher, student=student, pool_scale=0.25)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
    images, depths = batch
    targets = compute_teacher_targets(distiller, images, batch_size=3)
    assert targets["stride2"].shape == (4, 16, 16)  # 32x32 map, 8x8 kernel: 4x4 nodes, 16 channels
    live = distiller.evaluate(images, depths, return_dict=True, verbose=0)
    cached = Distiller(teacher=None, student=student, pool_scale=0.25)
    cached.compile(optimizer=keras.optimizers.Adam(1e-3))
    logs = cached.evaluate({"image": images, **targets}, depths, return_dict=True, verbose=0)
    np.testing.assert_allclose(logs["distill_loss"], live["distill_loss"], rtol=1e-5)
    assert logs["distill_loss"] > 0
