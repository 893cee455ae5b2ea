"""The phone path's graph: nearest upsampling as RESIZE_NEAREST_NEIGHBOR, the exact deploy rewrite
(head before the last upsampling), the log-depth head, and the float tail of int8 exports."""

import math

import keras
import numpy as np
import pytest

from benchmark.latency import estimate_batchnorm_statistics
from mdekd import export
from mdekd.models import build_student, build_teacher, deploy_model, inference_model, set_depth_prior
from mdekd.models.deploy import output_tail
from mdekd.models.layers import ExpDepth, UpsampleNearest

SIZE = (64, 96)


def trained_like(model, images):
    """BatchNorm statistics from one pass over ``images``: activations of a trained network's scale."""
    estimate_batchnorm_statistics(model, images)
    return model


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((4, *SIZE, 3), dtype=np.float32)


def test_nearest_upsampling_copies_each_pixel_as_the_reference():
    x = np.arange(2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 4, 2)
    expected = x.repeat(2, axis=1).repeat(2, axis=2)  # F.interpolate(scale_factor=2, mode="nearest")
    np.testing.assert_array_equal(UpsampleNearest(2)(x).numpy(), expected)
    np.testing.assert_array_equal(keras.layers.UpSampling2D(2)(x).numpy(), expected)


def test_nearest_student_converts_to_resize_nearest_neighbor_and_round_trips(tmp_path, images):
    student = build_student((*SIZE, 3), upsampling="nearest", alpha=0.25)
    ops = export.list_ops(export.convert(student, "none"))
    assert ops["RESIZE_NEAREST_NEIGHBOR"] == 5 and "TILE" not in ops and "RESIZE_BILINEAR" not in ops
    student.save(tmp_path / "nearest.keras")
    loaded = keras.models.load_model(tmp_path / "nearest.keras", compile=False)
    np.testing.assert_array_equal(loaded(images)["depth"].numpy(), student(images)["depth"].numpy())


@pytest.mark.parametrize("upsampling", ["bilinear", "nearest"])
@pytest.mark.parametrize("depth_output", ["softplus", "log"])
def test_deploy_graph_equals_the_training_graph(images, upsampling, depth_output):
    keras.utils.set_random_seed(1)
    student = trained_like(build_student((*SIZE, 3), upsampling=upsampling, alpha=0.25,
                                         depth_output=depth_output), images)
    set_depth_prior(student, 4.0)
    deployed = deploy_model(student)
    reference = inference_model(student)(images).numpy()
    relative = np.abs(deployed(images).numpy() - reference) / reference
    assert relative.max() <= 1e-5
    # The head now runs before the last upsampling, on a quarter of the pixels:
    late_upsampling = deployed.get_layer("decode5_up_deploy")
    assert tuple(late_upsampling.input.shape[1:]) == (SIZE[0] // 2, SIZE[1] // 2, 1)
    assert output_tail(deployed) == ["decode5_up_deploy", "depth"]
    assert not any(a is b for a in deployed.weights for b in student.weights)  # a copy


def test_a_model_without_the_student_head_deploys_as_its_inference_graph(images):
    teacher = build_teacher((*SIZE, 3), encoder="resnest14", decoder_channels=16)
    deployed = deploy_model(teacher)
    np.testing.assert_allclose(deployed(images).numpy(), inference_model(teacher)(images).numpy(), rtol=1e-6)


def test_log_head_outputs_exp_of_its_input_and_starts_at_the_prior():
    layer = ExpDepth()
    x = np.array([[-20.0, 0.0, math.log(7.5), 200.0]], np.float32)
    np.testing.assert_allclose(layer(x).numpy(), [[1e-3, 1.0, 7.5, math.exp(80.0)]], rtol=1e-5)
    assert layer.inverse(7.5) == pytest.approx(math.log(7.5))
    student = build_student((*SIZE, 3), alpha=0.25, depth_output="log")
    assert set_depth_prior(student, 6.0)
    depth = student(np.zeros((1, *SIZE, 3), np.float32))["depth"].numpy()
    np.testing.assert_allclose(depth, 6.0, rtol=1e-2)  # fresh BN: the head outputs ≈ β = log 6


def test_unknown_depth_output_is_refused():
    with pytest.raises(ValueError, match="depth_output must be one of"):
        build_student((*SIZE, 3), alpha=0.25, depth_output="linear")


def test_int8_keeps_the_tail_in_float_so_the_last_int8_tensor_is_the_head(images):
    student = trained_like(build_student((*SIZE, 3), alpha=0.25, depth_output="log"), images)
    tflite = export.convert(student, "int8", list(images))
    operators = export.list_operators(tflite)
    names = [name for name, _ in operators]
    last_dequantize = max(i for i, name in enumerate(names) if name == "DEQUANTIZE")
    assert any("head_conv" in output for output in operators[last_dequantize - 1][1]) or \
        names[last_dequantize - 1] == "CONV_2D"
    assert names[last_dequantize + 1:] in (["RESIZE_BILINEAR", "MAXIMUM", "MINIMUM", "EXP"],
                                          ["RESIZE_BILINEAR", "MINIMUM", "MAXIMUM", "EXP"])
