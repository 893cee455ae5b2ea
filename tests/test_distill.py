"""Distiller / DepthTrainer: the training step of the paper (design.md §1 total loss, frozen teacher)."""

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


# ---------------------------------------------------------------------------------------------
# Response distillation, unlabelled frames, node grids per stride, feature activation


def test_all_unlabelled_batch_gives_zero_supervised_gradient(batch):
    teacher, student = tiny_teacher(), tiny_student()
    distiller = Distiller(teacher=teacher, student=student, lambda_response=1.0)
    images, _ = batch
    unlabelled = tf.zeros((len(images), *SIZE, 1))
    with tf.GradientTape(persistent=True) as tape:
        _, targets = distiller.prepare_step(images)
        terms = distiller._terms(unlabelled, student(images, training=True), targets)
        supervised = distiller.lambda_si * terms["si_loss"] + distiller.lambda_gml * terms["gml_loss"]
    gradients = tape.gradient(supervised, student.trainable_variables)
    assert float(supervised) == 0.0
    assert all(g is None or not np.any(g.numpy()) for g in gradients)
    distilled = tape.gradient(terms["loss"], student.trainable_variables)
    assert sum(float(tf.reduce_sum(tf.abs(g))) for g in distilled if g is not None) > 0
    assert float(terms["response_loss"]) > 0 and float(terms["distill_loss"]) > 0


def test_unlabelled_frames_do_not_dilute_the_supervised_term(batch):
    student = tiny_student()
    trainer = DepthTrainer(student)
    images, depths = batch
    outputs = student(images, training=False)
    labelled = trainer.loss_terms(tf.constant(depths[:2]), {k: v[:2] for k, v in outputs.items()})
    mixed_depths = np.concatenate([depths[:2], np.zeros_like(depths[2:])])
    mixed = trainer.loss_terms(tf.constant(mixed_depths), outputs)
    np.testing.assert_allclose(float(mixed["si_loss"]), float(labelled["si_loss"]), rtol=1e-6)


def test_response_term_is_the_si_loss_against_the_teacher_depth(batch):
    teacher, student = tiny_teacher(), tiny_student()
    distiller = Distiller(teacher=teacher, student=student, lambda_d=0.0, lambda_response=0.5,
                          variance_focus=0.85)
    images, depths = batch
    s_out = student(images, training=False)
    terms = distiller._terms(tf.constant(depths), s_out, distiller.prepare_step(images)[1])
    expected = losses.response_distillation_loss(teacher(images)["depth"], s_out["depth"], 0.85)
    np.testing.assert_allclose(float(terms["response_loss"]), float(expected), rtol=1e-6)
    assert float(terms["distill_loss"]) == 0.0 and distiller.strides == ()
    np.testing.assert_allclose(
        float(terms["loss"]), float(terms["si_loss"] + 0.5 * terms["gml_loss"] + 0.5 * expected), rtol=1e-5)


def test_precomputed_targets_carry_the_teacher_depth_for_the_response_term(batch):
    teacher, student = tiny_teacher(), tiny_student()
    distiller = Distiller(teacher=teacher, student=student, lambda_response=1.0, pool_scale=0.25)
    images, depths = batch
    targets = compute_teacher_targets(distiller, images)
    assert targets["teacher_depth"].shape == (4, *SIZE, 1)
    cached = Distiller(teacher=None, student=student, lambda_response=1.0, pool_scale=0.25)
    cached.compile(optimizer=keras.optimizers.Adam(1e-3))
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
    live = distiller.evaluate(images, depths, return_dict=True, verbose=0)
    logs = cached.evaluate({"image": images, **targets}, depths, return_dict=True, verbose=0)
    np.testing.assert_allclose(logs["response_loss"], live["response_loss"], rtol=1e-5)


def test_node_grid_can_differ_per_stride():
    grid = {"stride16": None, "stride8": 0.5, "stride4": 0.25, "stride2": 0.125}
    distiller = Distiller(teacher=tiny_teacher(), student=tiny_student(), pool_scale=grid)
    # 64x64 input: maps 4x4, 8x8, 16x16, 32x32 -> kernels none, 4x4, 4x4, 4x4
    assert distiller.pool_sizes == {"stride16": None, "stride8": (4, 4), "stride4": (4, 4),
                                    "stride2": (4, 4)}


def test_node_grid_mapping_must_cover_every_distilled_stride():
    with pytest.raises(ValueError, match="stride2"):
        Distiller(teacher=tiny_teacher(), student=tiny_student(), pool_scale={"stride16": 0.5},
                  strides=("stride16", "stride2"))


def test_relu_feature_activation_compares_post_activation_maps(batch):
    teacher, student = tiny_teacher(), tiny_student()
    images, depths = batch
    plain = Distiller(teacher=teacher, student=student, strides=("stride16",), pool_scale=None)
    relu = Distiller(teacher=teacher, student=student, strides=("stride16",), pool_scale=None,
                     feature_activation="relu")
    t_out, s_out = teacher(images), student(images)
    assert float(tf.reduce_min(t_out["stride16"])) < 0  # the teacher's stride16 is pre-activation
    expected = losses.pairwise_distillation_loss(tf.nn.relu(s_out["stride16"]),
                                                 tf.nn.relu(t_out["stride16"]), pool_scale=None)
    got = relu._terms(tf.constant(depths), s_out, relu.prepare_step(images)[1])["distill_loss"]
    paper = plain._terms(tf.constant(depths), s_out, plain.prepare_step(images)[1])["distill_loss"]
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
    assert abs(float(got) - float(paper)) > 1e-6


def test_distiller_with_nothing_to_distil_is_refused():
    with pytest.raises(ValueError, match="nothing to distil"):
        Distiller(teacher=tiny_teacher(), student=tiny_student(), lambda_d=0.0)


def test_paper_defaults_are_the_spec_pairwise_loss(batch):
    teacher, student = tiny_teacher(), tiny_student()
    distiller = Distiller(teacher=teacher, student=student)
    images, depths = batch
    t_out, s_out = teacher(images), student(images)
    expected = sum(losses.pairwise_distillation_loss(s_out[k], t_out[k], pool_scale=0.5)
                   for k in ("stride16", "stride8", "stride4", "stride2"))
    got = distiller._terms(tf.constant(depths), s_out, distiller.prepare_step(images)[1])
    np.testing.assert_allclose(float(got["distill_loss"]), float(expected), rtol=1e-5)
    assert float(got["response_loss"]) == 0.0


def test_teacher_without_the_asked_stride_outputs_is_refused():
    image = keras.Input((*SIZE, 3))
    depth_only = keras.Model(image, {"depth": keras.layers.Conv2D(1, 1, name="d")(image)}, name="mono")
    with pytest.raises(ValueError, match=r"teacher 'mono' has no output\(s\) \['stride16', 'stride2'\]"):
        Distiller(teacher=depth_only, student=tiny_student(), strides=("stride16", "stride2"))
