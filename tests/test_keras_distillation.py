"""losses.PairwiseAffinityDistillation inside keras.distillation.Distiller (the Keras-native API)."""

import keras
import numpy as np
import pytest

from mdekd import losses
from mdekd.models import build_student, build_teacher, inference_model

SIZE = (64, 64, 3)


@pytest.fixture(scope="module")
def pair():
    keras.utils.set_random_seed(0)
    return build_teacher(SIZE, encoder="resnest14", decoder_channels=16), build_student(SIZE, alpha=0.25)


def test_feature_layer_names_point_at_the_stride_outputs(pair):
    teacher, student = pair
    for model in pair:
        for key, name in losses.feature_layer_names(model).items():
            assert model.get_layer(name).output is model.output[key]
    assert set(losses.feature_layer_names(student)) == {"stride16", "stride8", "stride4", "stride2"}


def test_keras_distiller_trains_a_step_with_the_pairwise_loss(pair):
    teacher, student = pair
    t_names, s_names = losses.feature_layer_names(teacher), losses.feature_layer_names(student)
    terms = [losses.PairwiseAffinityDistillation(t_names[k], s_names[k], pool_scale=0.25)
             for k in ("stride8", "stride2")]
    distiller = keras.distillation.Distiller(
        teacher=inference_model(teacher), student=inference_model(student),
        distillation_losses=terms, student_loss_weight=0.5)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3), loss=losses.scale_invariant_loss)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, *SIZE)).astype(np.float32)
    depths = rng.uniform(1.0, 10.0, (2, *SIZE[:2], 1)).astype(np.float32)
    t_out, s_out = teacher(images, training=False), student(images, training=True)  # as in the step
    expected = sum(losses.pairwise_distillation_loss(s_out[k], t_out[k], pool_scale=0.25)
                   for k in ("stride8", "stride2"))
    before = [w.copy() for w in teacher.get_weights()]
    student_before = [v.numpy().copy() for v in student.trainable_variables]
    logs = distiller.train_on_batch(images, depths, return_dict=True)
    np.testing.assert_allclose(logs["distillation_loss"], float(expected), rtol=1e-4)
    assert logs["distillation_loss"] > 0
    for b, a in zip(before, teacher.get_weights()):
        np.testing.assert_array_equal(b, a)
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(student_before, student.trainable_variables))


def test_pairwise_distillation_loss_object_equals_the_function(pair):
    teacher, student = pair
    images = np.random.default_rng(1).uniform(size=(2, *SIZE)).astype(np.float32)
    t_out, s_out = teacher(images), student(images)
    term = losses.PairwiseAffinityDistillation("a", "b", pool_scale=None)
    np.testing.assert_allclose(float(term.compute_loss(t_out["stride4"], s_out["stride4"])),
                               float(losses.pairwise_distillation_loss(s_out["stride4"], t_out["stride4"],
                                                                       pool_scale=None)), rtol=1e-6)
    assert losses.PairwiseAffinityDistillation.from_config(term.get_config()).pool_scale is None


def test_layers_of_different_size_are_refused(pair):
    teacher, student = pair
    t_names, s_names = losses.feature_layer_names(teacher), losses.feature_layer_names(student)
    with pytest.raises(ValueError, match="H×W must match"):
        keras.distillation.Distiller(
            teacher=inference_model(teacher), student=inference_model(student),
            distillation_losses=losses.PairwiseAffinityDistillation(t_names["stride16"], s_names["stride2"]))
