"""ResNeSt encoder and timm weight loading against the timm fixtures of tests/fixtures (design.md §4)."""

import subprocess
import sys

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mdekd.models import RESNEST_VARIANTS, build_resnest, load_timm_resnest_weights, trainable_parameter_count
from mdekd.models.convert_resnest import convert_resnest_weights

from conftest import FIXTURES, REPO_ROOT

FIXTURE_WEIGHTS = "resnest14d_random.safetensors"
FIXTURE_IO = "resnest14d_random_io.npz"
# npz key -> encoder output (stem: the max pool, for locating a defect)
STAGES = {"stem": "maxpool", "layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}


@pytest.fixture(scope="module")
def weights_path():
    return FIXTURES / FIXTURE_WEIGHTS


@pytest.fixture(scope="module")
def fixture_tensors(weights_path):
    return load_file(str(weights_path)), np.load(FIXTURES / FIXTURE_IO)


@pytest.fixture(scope="module")
def resnest14_with_stem(weights_path):
    """resnest14 with the fixture weights, as a model that also outputs the stem."""
    encoder = build_resnest("resnest14")
    load_timm_resnest_weights(encoder, weights_path)
    outputs = {"maxpool": encoder.get_layer("maxpool").output, **encoder.output}
    return encoder, keras.Model(encoder.input, outputs)


def _write(tmp_path, tensors, name="modified.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("suffix", ["", "_odd"], ids=["64x96", "67x93"])
def test_resnest14_matches_timm_reference_at_every_stage(resnest14_with_stem, fixture_tensors, suffix):
    _, reference = fixture_tensors
    _, with_stem = resnest14_with_stem
    image = reference[f"input_nchw{suffix}"].transpose(0, 2, 3, 1)
    outputs = {key: np.asarray(value) for key, value in with_stem(image, training=False).items()}
    errors = {}
    for npz_key, output_key in STAGES.items():
        expected = reference[f"{npz_key}{suffix}"].transpose(0, 2, 3, 1)
        assert outputs[output_key].shape == expected.shape, npz_key
        errors[npz_key] = float(np.abs(outputs[output_key] - expected).max())
        assert errors[npz_key] <= 2e-4 * max(1.0, float(np.abs(expected).max())), (npz_key, errors)
    print(f"max abs error {suffix or '_even'}: {errors}")


def test_resnest101_has_reference_parameter_count():
    assert trainable_parameter_count(build_resnest("resnest101")) == 46_226_016


@pytest.mark.parametrize(
    "variant, parameters", [("resnest14", 8_562_688), ("resnest26", 15_020_448), ("resnest50", 25_434_240)]
)
def test_small_resnest_variants_match_timm_parameter_counts(variant, parameters):
    # timm resnest14d/26d/50d without the fc head (tests/fixtures/README.md)
    assert trainable_parameter_count(build_resnest(variant)) == parameters


def test_resnest_variant_table_holds_the_timm_configurations():
    assert RESNEST_VARIANTS["resnest200"] == ((3, 24, 36, 3), 64)
    assert RESNEST_VARIANTS["resnest269"] == ((3, 30, 48, 8), 64)


def test_resnest_outputs_c2_to_c5_at_strides_4_to_32():
    encoder = build_resnest("resnest14", input_shape=(64, 96, 3))
    shapes = {key: tuple(tensor.shape) for key, tensor in encoder.output.items()}
    assert shapes == {
        "c2": (None, 16, 24, 256),
        "c3": (None, 8, 12, 512),
        "c4": (None, 4, 6, 1024),
        "c5": (None, 2, 3, 2048),
    }


def test_resnest_batchnorms_use_torch_epsilon_and_momentum():
    encoder = build_resnest("resnest14")
    settings = {
        (layer.epsilon, layer.momentum)
        for layer in encoder.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert settings == {(1e-5, 0.9)}


def test_unknown_resnest_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="resnest18.*resnest14.*resnest269"):
        build_resnest("resnest18")


def test_timm_loader_ignores_classifier_and_batch_counters(fixture_tensors, tmp_path):
    tensors, _ = fixture_tensors
    extended = dict(tensors)
    extended["fc.weight"] = np.zeros((1000, 2048), np.float32)
    extended["fc.bias"] = np.zeros((1000,), np.float32)
    extended["bn1.num_batches_tracked"] = np.array(7, np.int64)
    encoder = build_resnest("resnest14")
    load_timm_resnest_weights(encoder, _write(tmp_path, extended))
    np.testing.assert_array_equal(
        encoder.get_layer("layer3_0_conv2_conv").kernel.numpy(),
        tensors["layer3.0.conv2.conv.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(encoder.get_layer("bn1").moving_variance.numpy(), tensors["bn1.running_var"])


def test_timm_loader_names_a_missing_tensor(fixture_tensors, tmp_path):
    tensors, _ = fixture_tensors
    reduced = {key: value for key, value in tensors.items() if key != "layer2.0.conv2.fc1.bias"}
    with pytest.raises(ValueError, match=r"1 missing \(first: 'layer2.0.conv2.fc1.bias'\)"):
        load_timm_resnest_weights(build_resnest("resnest14"), _write(tmp_path, reduced))


def test_timm_loader_names_an_unexpected_tensor(fixture_tensors, tmp_path):
    tensors, _ = fixture_tensors
    extended = {**tensors, "layer1.0.se.weight": np.zeros((4, 4), np.float32)}
    with pytest.raises(ValueError, match=r"1 unexpected \(first: 'layer1.0.se.weight'\)"):
        load_timm_resnest_weights(build_resnest("resnest14"), _write(tmp_path, extended))


def test_timm_loader_names_a_wrongly_shaped_tensor_and_both_shapes(fixture_tensors, tmp_path):
    tensors, _ = fixture_tensors
    changed = {**tensors, "layer3.0.conv1.weight": np.zeros((256, 512, 3, 3), np.float32)}
    encoder = build_resnest("resnest14")
    before = encoder.get_layer("conv1_0").kernel.numpy()
    with pytest.raises(ValueError, match=r"'layer3.0.conv1.weight' has shape \(256, 512, 3, 3\).*\(256, 512, 1, 1\)"):
        load_timm_resnest_weights(encoder, _write(tmp_path, changed))
    # nothing is assigned when the file does not fit
    np.testing.assert_array_equal(encoder.get_layer("conv1_0").kernel.numpy(), before)


def test_timm_loader_rejects_weights_of_another_variant(weights_path):
    with pytest.raises(ValueError, match=r"missing \(first: 'layer1.1.conv1.weight'\)"):
        load_timm_resnest_weights(build_resnest("resnest26"), weights_path)


def test_timm_loader_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_timm_resnest_weights(build_resnest("resnest14"), tmp_path / "absent.safetensors")


def test_timm_loader_names_a_corrupt_file(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_timm_resnest_weights(build_resnest("resnest14"), corrupt)


def test_converted_weights_reload_into_a_fresh_encoder(fixture_tensors, weights_path, tmp_path):
    tensors, _ = fixture_tensors
    output = tmp_path / "resnest14.weights.h5"
    convert_resnest_weights(weights_path, "resnest14", output)
    assert [p.name for p in tmp_path.iterdir()] == ["resnest14.weights.h5"]  # no temporary left
    fresh = build_resnest("resnest14", name="another_name")
    fresh.load_weights(output)
    np.testing.assert_array_equal(
        fresh.get_layer("layer4_0_conv2_fc2").bias.numpy(), tensors["layer4.0.conv2.fc2.bias"]
    )


def test_converter_requires_a_weights_h5_output(weights_path, tmp_path):
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        convert_resnest_weights(weights_path, "resnest14", tmp_path / "enc.h5")


def test_converter_cli_writes_the_weights_file(weights_path, tmp_path):
    output = tmp_path / "enc.weights.h5"
    command = [sys.executable, "-m", "mdekd.models.convert_resnest", f"--input={weights_path}",
               "--variant=resnest14", f"--output={output}"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert output.stat().st_size > 30_000_000
