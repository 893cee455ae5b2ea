"""Quantisation-aware fine-tuning (design.md §5): the Keras model that computes what the int8 TFLite
model computes, its calibration, its fine-tuning against the float student, and its export."""

import json

import keras
import numpy as np
import pytest

from benchmark.latency import estimate_batchnorm_statistics
from mdekd import export, quantization_aware
from mdekd.data.synthetic import generate_dataset
from mdekd.models import build_student, deploy_model
from mdekd.models.common import iter_layers
from mdekd.models.deploy import UPSAMPLING_LAYERS, output_tail
from mdekd.models.layers import FakeQuant, fake_quant_kernel
from mdekd.quantization_aware import (calibrate, fake_quant_layers, int8_tensor_layers,
                                      quantization_aware_model, relative_deviation, without_fake_quant)

SIZE = (64, 96)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((8, *SIZE, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def student(images):
    keras.utils.set_random_seed(3)
    model = build_student((*SIZE, 3), alpha=0.25)
    estimate_batchnorm_statistics(model, images)  # trained-like activation scales
    return model


@pytest.fixture(scope="module")
def calibrated(student, images):
    aware = quantization_aware_model(student)
    calibrate(aware, images)
    return aware


def test_fake_quant_rounds_to_256_levels_over_its_range():
    layer = FakeQuant()
    layer.build((None, 4))
    layer.range_min.assign(-1.0)
    layer.range_max.assign(2.0)
    x = np.array([[-3.0, -0.01, 0.5, 1.3, 5.0]], np.float32)
    step = 3.0 / 255  # zero (85 steps above -1) is exactly a level, so the range needs no nudge
    expected = np.round((np.clip(x, -1.0, 2.0) + 1.0) / step) * step - 1.0
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-6)
    assert len(np.unique(layer(np.linspace(-2, 3, 4001, dtype=np.float32)[None]).numpy())) == 256


def test_observing_fake_quant_passes_through_and_widens_its_range_to_hold_zero():
    layer = FakeQuant()
    layer.build((None, 3))
    layer.observing = True
    x = np.array([[0.5, 1.5, 3.25]], np.float32)
    np.testing.assert_array_equal(layer(x).numpy(), x)
    layer(np.array([[0.25, 2.0, 1.0]], np.float32))
    assert (float(layer.range_min.numpy()), float(layer.range_max.numpy())) == (0.0, 3.25)


def test_calibration_by_quantile_clips_the_outliers():
    layer = FakeQuant()
    layer.build((None, 1001))
    layer.observing = 0.99
    layer(np.concatenate([np.linspace(0, 1, 1000), [50.0]]).astype(np.float32)[None])
    assert float(layer.range_min.numpy()) == 0.0
    assert 0.98 < float(layer.range_max.numpy()) < 1.0  # not the outlier 50


def test_fake_quant_kernel_is_tflites_per_channel_symmetric_int8():
    kernel = np.random.default_rng(1).normal(size=(3, 3, 4, 5)).astype(np.float32)
    kernel[..., 2] *= 100.0  # a wide channel does not coarsen the others (per channel)
    step = np.abs(kernel).reshape(-1, 5).max(axis=0) / 127
    np.testing.assert_allclose(fake_quant_kernel(kernel).numpy(), np.round(kernel / step) * step,
                               rtol=1e-6, atol=1e-6)


def test_fake_quants_sit_on_the_int8_tensors_of_the_deployed_graph(student, calibrated):
    deployed = deploy_model(student)
    names = int8_tensor_layers(deployed)
    by_name = {layer.name: layer for layer in deployed.layers}
    by_name.update({layer.name: layer for layer in deployed.get_layer("encoder").layers})
    kinds = {type(by_name[name]).__name__ for name in names if name in by_name}
    assert kinds == {"ReLU", "Add", "BatchNormalization"}  # BN: only the head's; the input stays float
    assert [name for name in names if type(by_name.get(name)).__name__ == "BatchNormalization"] == ["head_bn"]
    assert not any(isinstance(by_name.get(name), UPSAMPLING_LAYERS) for name in names)
    assert not set(names) & set(output_tail(deployed))
    assert len(fake_quant_layers(calibrated)) == len(names)


def test_folding_batchnorm_into_the_convolutions_keeps_the_float_network(student, calibrated, images):
    reference = deploy_model(student)(images).numpy()
    folded = without_fake_quant(calibrated)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in iter_layers(folded))
    relative = np.abs(folded(images).numpy() - reference) / reference
    # float32 rounding amplified by random weights (quantization.py: 2.5e-5 mean); a wrong fold errs by %
    assert relative.mean() < 1e-4 and relative.max() < 1e-3


def test_calibrated_model_rounds_its_tensors(student, calibrated, images):
    deviation = relative_deviation(calibrated, deploy_model(student), images)
    assert np.all(np.isfinite(list(deviation.values())))
    assert deviation["mean_relative_diff"] > 1e-3  # 256 levels, not float


def test_int8_export_uses_the_models_ranges_and_weights(calibrated):
    # The first three layers of the encoder: the int8 model computes what Keras does to the
    # level (deeper, a random network amplifies each 1-level tie-break difference, design.md §5).
    encoder = calibrated.get_layer("encoder")
    head = keras.Model(encoder.input, encoder.get_layer("conv_pw_1_relu_quant").output)
    image = keras.Input(encoder.input.shape[1:])
    quantize_input = FakeQuant(name="input_quant")
    prefix = keras.Model(image, head(quantize_input(image)))
    quantize_input.range_min.assign(-1.0)
    quantize_input.range_max.assign(1.0)
    x = np.random.default_rng(4).uniform(-1, 1, (2, *SIZE, 3)).astype(np.float32)
    tflite = export.convert(prefix, "int8")  # no representative images: the ranges are in the model
    ops = export.list_ops(tflite)
    assert (ops["CONV_2D"], ops["DEPTHWISE_CONV_2D"], ops["QUANTIZE"], ops["DEQUANTIZE"]) == (2, 1, 1, 1)
    last = encoder.get_layer("conv_pw_1_relu_quant")
    step = (float(last.range_max.numpy()) - float(last.range_min.numpy())) / 255
    runner = export.TFLiteRunner(tflite, num_threads=1)
    levels = np.abs(np.concatenate([runner.predict(v[None]) for v in x]) - prefix(x).numpy()) / step
    assert levels.mean() < 0.05 and levels.max() <= 2.01


def test_fine_tuning_trains_the_kernels_against_the_float_student_with_ranges_fixed(student, images):
    aware = quantization_aware_model(student)
    calibrate(aware, images)
    reference = deploy_model(student)
    read_ranges = lambda: [(float(layer.range_min.numpy()), float(layer.range_max.numpy()))  # noqa: E731
                           for layer in fake_quant_layers(aware)]
    ranges = read_ranges()
    kernels = [weight.numpy().copy() for weight in aware.trainable_weights]
    reference_weights = [weight.numpy().copy() for weight in reference.weights]
    before = np.abs(np.log(aware(images[:4])["depth"].numpy()) - np.log(reference(images[:4]).numpy())).mean()
    losses = quantization_aware.fine_tune(aware, reference, images[:4], steps=3, learning_rate=1e-4,
                                          batch_size=4, progress=False)
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    assert losses[0] == pytest.approx(before, rel=0.5)  # the same deviation, on flipped images
    assert read_ranges() == ranges
    assert all(not np.array_equal(k, w.numpy()) for k, w in zip(kernels, aware.trainable_weights))
    assert all(np.array_equal(r, w.numpy()) for r, w in zip(reference_weights, reference.weights))


def test_float_layers_lose_their_fake_quant_and_unknown_names_are_refused(student):
    stem = ["conv1_relu", "conv_dw_1_relu"]
    aware = quantization_aware_model(student, float_layers=stem)
    names = {layer.name for layer in fake_quant_layers(aware)}
    assert not names & {f"{name}_quant" for name in stem} and "conv_pw_1_relu_quant" in names
    with pytest.raises(ValueError, match="--float_layers: no layer conv_99"):
        quantization_aware_model(student, float_layers=["conv_99"])


def test_an_already_quantization_aware_model_is_refused(calibrated):
    with pytest.raises(ValueError, match="already quantisation-aware"):
        quantization_aware_model(calibrated)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("data") / "synthetic", train=6, validation=4,
                            height=SIZE[0], width=SIZE[1], seed=0, workers=1, progress=False)


@pytest.fixture(scope="module")
def qat_file(data_dir, tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("run") / "best.keras"
    build_student((*SIZE, 3), alpha=0.25).save(path)  # untrained: passes every export gate
    report = quantization_aware.fine_tune_file(path, images=data_dir, dataset="synthetic", steps=4,
                                               batch_size=2, progress=False, log=lambda *_: None)
    return path.with_name("best_qat.keras"), report


def test_fine_tune_file_writes_a_loadable_model_and_its_report(qat_file, images):
    path, report = qat_file
    assert json.loads(path.with_name("best_qat.keras.json").read_text()) == report
    assert report["steps"] == 4 and report["num_images"] == 6
    assert set(report["held_out_deviation_vs_float"]) == {"calibrated", "fine_tuned"}
    loaded = keras.models.load_model(path, compile=False)
    assert quantization_aware.is_quantization_aware(loaded)
    assert len(fake_quant_layers(loaded)) == report["fake_quant_ranges"]
    assert all(float(layer.range_max.numpy()) > float(layer.range_min.numpy())
               for layer in fake_quant_layers(loaded))


def test_export_of_a_quantization_aware_model_needs_no_calibration(qat_file, data_dir, tmp_path):
    path, _ = qat_file
    report = export.export_tflite(path, "int8", output=tmp_path / "qat_int8.tflite",
                                  validation_data=data_dir, dataset="synthetic", progress=False,
                                  log=lambda *_: None)
    assert report["quantization_aware"] and report["calibration"] is None
    assert report["mean_relative_diff"] < 0.01
    fp32 = export.export_tflite(path, "none", output=tmp_path / "qat_fp32.tflite",
                                validation_data=data_dir, dataset="synthetic", progress=False,
                                log=lambda *_: None)
    assert fp32["quantization_aware"] and fp32["max_relative_diff"] < 1e-4  # its float network
    # beside the model, a name of its own (the post-training export is student_int8.tflite)
    assert export.default_output_path(path, "int8", quantization_aware=True) == str(
        path.with_name("student_qat_int8.tflite"))


def test_bad_inputs_are_refused_naming_the_flag(qat_file, data_dir, tmp_path):
    path, _ = qat_file
    with pytest.raises(ValueError, match="--model: .* already quantisation-aware"):
        quantization_aware.fine_tune_file(path, images=data_dir, dataset="synthetic", progress=False)
    with pytest.raises(ValueError, match="--input_size"):
        export.export_tflite(path, "int8", input_size=(32, 64), validation_data=data_dir,
                             dataset="synthetic", output=tmp_path / "x.tflite", log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="--model"):
        quantization_aware.fine_tune_file(tmp_path / "missing.keras", images=data_dir)
    with pytest.raises(ValueError, match="--calibration_quantile"):
        quantization_aware.fine_tune_file(path, images=data_dir, calibration_quantile=2.0)
    assert not list(tmp_path.iterdir())


def test_cli_reports_a_missing_model_in_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mdekd.quantization_aware",
                             f"--model={tmp_path / 'none.keras'}", f"--images={tmp_path}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"mdekd.quantization_aware: error: --model: Keras model not found: {tmp_path / 'none.keras'}")
