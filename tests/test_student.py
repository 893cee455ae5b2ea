"""FastDepth student (design.md §4): size, cost, outputs, positivity, weights, serialisation."""

import keras
import numpy as np
import pytest

from mdekd.constants import MIN_DEPTH
from mdekd.models import build_student, count_macs, inference_model, trainable_parameter_count
from mdekd.models.layers import UpsampleNearest

TINY = dict(input_shape=(64, 64, 3), alpha=0.25)


@pytest.fixture(scope="module")
def full_student():
    """α = 1 at 480×640, built once and only inspected (no forward pass)."""
    return build_student(input_shape=(480, 640, 3))


@pytest.fixture(scope="module")
def tiny_student():
    return build_student(**TINY)


def _images(batch=2, height=64, width=64, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (batch, height, width, 3)).astype("float32")


def test_student_has_reference_parameter_count(full_student):
    # dwofk/fast-depth MobileNetSkipAdd: 3,206,976 encoder + 753,954 decoder; softplus adds nothing
    assert trainable_parameter_count(full_student) == 3_960_930


def test_student_macs_match_fastdepth_at_480x640(full_student):
    assert count_macs(full_student) / 1e9 == pytest.approx(4.51, rel=0.02)


def test_student_macs_match_fastdepth_at_224x224():
    assert count_macs(build_student(input_shape=(224, 224, 3))) / 1e9 == pytest.approx(0.737, rel=0.02)


def test_student_outputs_depth_and_decoder_maps_at_their_strides(full_student):
    shapes = {key: tuple(tensor.shape) for key, tensor in full_student.output.items()}
    assert shapes == {
        "depth": (None, 480, 640, 1),
        "stride16": (None, 30, 40, 512),
        "stride8": (None, 60, 80, 256),
        "stride4": (None, 120, 160, 128),
        "stride2": (None, 240, 320, 64),
    }


def test_student_skips_are_added_after_upsampling(full_student):
    for stage, tap in ((2, "conv_pw_5_relu"), (3, "conv_pw_3_relu"), (4, "conv_pw_1_relu")):
        skip = full_student.get_layer(f"decode{stage}_skip")
        upsampled = full_student.get_layer(f"decode{stage}_up").output
        tapped = full_student.get_layer("encoder").get_layer(tap).output
        assert tuple(skip.input[0].shape) == tuple(upsampled.shape)
        assert tuple(skip.input[1].shape) == tuple(tapped.shape)


def test_every_student_batchnorm_has_momentum_0_9(full_student):
    from mdekd.models.common import iter_layers

    momenta = {layer.momentum for layer in iter_layers(full_student) if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {0.9}


def test_student_depth_is_positive_for_large_negative_preactivations(tiny_student):
    head_bn = tiny_student.get_layer("head_bn")
    gamma, beta, mean, variance = head_bn.get_weights()
    head_bn.set_weights([gamma * 0.0, beta * 0.0 - 1e4, mean, variance])
    try:
        depth = tiny_student.predict(_images(), verbose=0)["depth"]
    finally:
        head_bn.set_weights([gamma, beta, mean, variance])
    assert np.all(np.isfinite(depth))
    np.testing.assert_allclose(depth, MIN_DEPTH, rtol=1e-6)


def test_student_normalises_unit_range_input_to_minus_one_one(tiny_student):
    normalise = keras.Model(tiny_student.input, tiny_student.get_layer("mobilenet_normalization").output)
    image = np.zeros((1, 64, 64, 3), "float32")
    image[:, :32] = 1.0
    out = normalise.predict(image, verbose=0)
    np.testing.assert_array_equal(np.unique(out), [-1.0, 1.0])
    assert out[0, 0, 0, 0] == 1.0 and out[0, -1, 0, 0] == -1.0


def test_student_rejects_input_size_not_divisible_by_32():
    with pytest.raises(ValueError, match="100x64"):
        build_student(input_shape=(100, 64, 3), alpha=0.25)


def test_student_rejects_unknown_upsampling():
    with pytest.raises(ValueError, match="bicubic"):
        build_student(**TINY, upsampling="bicubic")


@pytest.mark.parametrize("upsampling", ["nearest", "bilinear"])
def test_student_upsampling_mode_is_selectable(upsampling):
    student = build_student(**TINY, upsampling=upsampling)
    layers = [student.get_layer(f"decode{i}_up") for i in range(1, 6)]
    if upsampling == "nearest":  # RESIZE_NEAREST_NEIGHBOR in TFLite (tests/test_deploy.py)
        assert all(isinstance(layer, UpsampleNearest) for layer in layers)
    else:
        assert {layer.interpolation for layer in layers} == {"bilinear"}


def test_inference_model_returns_the_depth_output_only(tiny_student):
    images = _images()
    depth_only = inference_model(tiny_student)
    assert len(depth_only.outputs) == 1
    np.testing.assert_allclose(
        depth_only.predict(images, verbose=0), tiny_student.predict(images, verbose=0)["depth"], rtol=0, atol=0
    )


def test_student_keras_file_round_trip_gives_identical_outputs(tiny_student, tmp_path):
    path = tmp_path / "student.keras"
    tiny_student.save(path)
    loaded = keras.models.load_model(path)
    images = _images()
    expected = tiny_student.predict(images, verbose=0)
    actual = loaded.predict(images, verbose=0)
    assert sorted(actual) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key])
    from mdekd.models.common import iter_layers

    momenta = {layer.momentum for layer in iter_layers(loaded) if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {0.9}


def test_student_loads_encoder_weights_from_file(tmp_path):
    donor = keras.applications.MobileNet(input_shape=(64, 64, 3), alpha=0.25, include_top=False, weights=None)
    donor.set_weights([np.random.default_rng(1).normal(size=w.shape).astype("float32") for w in donor.get_weights()])
    path = tmp_path / "mobilenet.weights.h5"
    donor.save_weights(path)
    student = build_student(**TINY, encoder_weights=str(path))
    loaded = student.get_layer("encoder").get_layer("conv_pw_13").get_weights()[0]
    np.testing.assert_array_equal(loaded, donor.get_layer("conv_pw_13").get_weights()[0])


def test_student_missing_encoder_weights_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.weights.h5"
    with pytest.raises(FileNotFoundError, match="nowhere.weights.h5"):
        build_student(**TINY, encoder_weights=str(missing))


def test_student_imagenet_weights_come_from_keras_cache_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras.utils, "get_file", _no_network)
    donor = keras.applications.MobileNet(input_shape=(224, 224, 3), alpha=0.25, include_top=False, weights=None)
    (tmp_path / "models").mkdir()
    donor.save(tmp_path / "models" / "mobilenet_2_5_224_tf_no_top.h5")  # legacy h5, as Keras ships them
    student = build_student(**TINY, encoder_weights="imagenet")
    loaded = student.get_layer("encoder").get_layer("conv1").get_weights()[0]
    np.testing.assert_array_equal(loaded, donor.get_layer("conv1").get_weights()[0])


def test_student_imagenet_weights_without_network_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras.utils, "get_file", _no_network)
    with pytest.raises(FileNotFoundError) as error:
        build_student(**TINY, encoder_weights="imagenet")
    message = str(error.value)
    assert "mobilenet_2_5_224_tf_no_top.h5" in message
    assert str(tmp_path / "models" / "mobilenet_2_5_224_tf_no_top.h5") in message


def _no_network(*args, **kwargs):
    raise OSError("simulated: no network")
