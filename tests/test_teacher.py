"""Teacher: ResNeSt + Xian et al. fusion decoder (design.md §4): size, cost, outputs, weights, serialisation."""

import keras
import numpy as np
import pytest

from mdekd.constants import MIN_DEPTH
from mdekd.models import (
    build_resnest,
    build_student,
    build_teacher,
    count_macs,
    inference_model,
    load_timm_resnest_weights,
    trainable_parameter_count,
)
from mdekd.models.common import iter_layers
from mdekd.models.convert_resnest import convert_resnest_weights

from conftest import FIXTURES

TINY = dict(input_shape=(64, 64, 3), encoder="resnest14", decoder_channels=16)
FIXTURE_WEIGHTS = FIXTURES / "resnest14d_random.safetensors"


@pytest.fixture(scope="module")
def full_teacher():
    """ResNeSt-101 teacher at 480×640, built once and only inspected (no forward pass)."""
    return build_teacher(input_shape=(480, 640, 3))


@pytest.fixture(scope="module")
def tiny_teacher():
    return build_teacher(**TINY)


def _images(batch=2, height=64, width=64, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (batch, height, width, 3)).astype("float32")


def test_teacher_has_reference_parameter_count(full_teacher):
    assert trainable_parameter_count(full_teacher) == 74_844_513


def test_teacher_splits_into_resnest101_and_fusion_decoder(full_teacher):
    encoder = trainable_parameter_count(full_teacher.get_layer("encoder"))
    assert encoder == 46_226_016
    assert trainable_parameter_count(full_teacher) - encoder == 28_618_497


def test_teacher_macs_at_480x640(full_teacher):
    assert count_macs(full_teacher) / 1e9 == pytest.approx(184, rel=0.03)


def test_teacher_outputs_depth_and_decoder_maps_at_their_strides(full_teacher):
    shapes = {key: tuple(tensor.shape) for key, tensor in full_teacher.output.items()}
    assert shapes == {
        "depth": (None, 480, 640, 1),
        "stride16": (None, 30, 40, 256),
        "stride8": (None, 60, 80, 256),
        "stride4": (None, 120, 160, 256),
        "stride2": (None, 240, 320, 256),
    }


def test_every_teacher_batchnorm_has_momentum_0_9(full_teacher):
    momenta = {layer.momentum for layer in iter_layers(full_teacher) if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {0.9}


def test_teacher_and_student_decoder_maps_have_the_same_sizes(tiny_teacher):
    student = build_student(input_shape=(64, 64, 3), alpha=0.25)
    for key in ("stride16", "stride8", "stride4", "stride2"):
        assert tiny_teacher.output[key].shape[1:3] == student.output[key].shape[1:3], key


def test_teacher_normalises_unit_range_input_with_imagenet_statistics(tiny_teacher):
    normalise = keras.Model(tiny_teacher.input, tiny_teacher.get_layer("imagenet_normalization").output)
    mean_colour = np.broadcast_to(np.float32([0.485, 0.456, 0.406]), (1, 64, 64, 3))
    np.testing.assert_allclose(normalise.predict(mean_colour, verbose=0), 0.0, atol=1e-6)
    white = normalise.predict(np.ones((1, 64, 64, 3), np.float32), verbose=0)[0, 0, 0]
    np.testing.assert_allclose(white, (1 - np.float32([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], rtol=1e-6)


def test_teacher_depth_is_positive_for_large_negative_preactivations(tiny_teacher):
    head = tiny_teacher.get_layer("head_conv2")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 0.0, bias * 0.0 - 1e4])
    try:
        depth = tiny_teacher.predict(_images(), verbose=0)["depth"]
    finally:
        head.set_weights([kernel, bias])
    assert np.all(np.isfinite(depth))
    np.testing.assert_allclose(depth, MIN_DEPTH, rtol=1e-6)


def test_teacher_depth_is_positive_with_random_weights(tiny_teacher):
    assert np.all(tiny_teacher.predict(_images(), verbose=0)["depth"] > 0)


def test_teacher_rejects_input_size_not_divisible_by_32():
    with pytest.raises(ValueError, match="64x80"):
        build_teacher(input_shape=(64, 80, 3), encoder="resnest14", decoder_channels=16)


def test_teacher_rejects_unknown_encoder_and_lists_the_known_ones():
    with pytest.raises(ValueError, match="resnest34.*resnest101"):
        build_teacher(input_shape=(64, 64, 3), encoder="resnest34", decoder_channels=16)


def test_inference_model_of_teacher_returns_depth_only(tiny_teacher):
    images = _images()
    depth_only = inference_model(tiny_teacher)
    assert len(depth_only.outputs) == 1
    np.testing.assert_array_equal(depth_only.predict(images, verbose=0), tiny_teacher.predict(images, verbose=0)["depth"])


def test_teacher_keras_file_round_trip_gives_identical_outputs(tiny_teacher, tmp_path):
    path = tmp_path / "teacher.keras"
    tiny_teacher.save(path)
    loaded = keras.models.load_model(path)
    images = _images()
    expected = tiny_teacher.predict(images, verbose=0)
    actual = loaded.predict(images, verbose=0)
    assert sorted(actual) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key])


@pytest.fixture(scope="module")
def fixture_encoder():
    encoder = build_resnest("resnest14", input_shape=(64, 64, 3))
    load_timm_resnest_weights(encoder, FIXTURE_WEIGHTS)
    return encoder


def _assert_same_encoder_weights(teacher, encoder):
    for actual, expected in zip(teacher.get_layer("encoder").weights, encoder.weights):
        np.testing.assert_array_equal(actual.numpy(), expected.numpy())


def test_teacher_reads_timm_safetensors_encoder_weights(fixture_encoder):
    teacher = build_teacher(**TINY, encoder_weights=str(FIXTURE_WEIGHTS))
    _assert_same_encoder_weights(teacher, fixture_encoder)


def test_teacher_reads_converted_keras_encoder_weights(fixture_encoder, tmp_path):
    converted = tmp_path / "resnest14.weights.h5"
    convert_resnest_weights(FIXTURE_WEIGHTS, "resnest14", converted)
    teacher = build_teacher(**TINY, encoder_weights=str(converted))
    _assert_same_encoder_weights(teacher, fixture_encoder)


def test_teacher_missing_encoder_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        build_teacher(**TINY, encoder_weights=str(tmp_path / "nothing.safetensors"))


def test_teacher_rejects_encoder_weights_of_unknown_format(tmp_path):
    path = tmp_path / "encoder.pth"
    path.write_bytes(b"torch pickle")
    with pytest.raises(ValueError, match=r"encoder.pth.*\.safetensors or \.weights\.h5"):
        build_teacher(**TINY, encoder_weights=str(path))
