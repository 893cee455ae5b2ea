"""TFLite export (design.md §5): every mode converts to builtin ops, matches Keras, and is written only
after verification; bad inputs fail early with messages that name the culprit."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdekd import export, quantization
from mdekd.data.synthetic import generate_dataset
from mdekd.models import build_student

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = (64, 64)


@pytest.fixture(scope="module")
def student():
    keras.utils.set_random_seed(0)
    return build_student((*SIZE, 3), alpha=0.25)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("data") / "synthetic", train=6, validation=4,
                            height=SIZE[0], width=SIZE[1], seed=0, workers=1, progress=False)


@pytest.fixture(scope="module")
def student_file(student, tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "best.keras"
    student.save(path)
    return path


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).random((3, *SIZE, 3), dtype=np.float32)


def _calibration(count=4):
    rng = np.random.default_rng(2)
    return [rng.random((*SIZE, 3), dtype=np.float32) for _ in range(count)]


@pytest.fixture(scope="module")
def converted(student):
    """One conversion per mode, shared by the tests below (each takes seconds)."""
    return {mode: export.convert(student, mode, _calibration() if mode == "int8" else None)
            for mode in quantization.NAMES}


@pytest.mark.parametrize("mode", quantization.NAMES)
def test_every_mode_converts_to_builtin_ops_and_matches_keras(student, converted, images, mode):
    ops = export.list_ops(converted[mode])
    assert ops.get("CONV_2D", 0) > 0 and ops.get("DEPTHWISE_CONV_2D", 0) > 0
    assert export.forbidden_ops(ops) == []
    report = export.verify(converted[mode], student, images, mode=mode, num_threads=1)
    assert report["passed"]
    assert report["mean_relative_diff"] <= quantization.get_mode(mode).tolerance.mean_relative
    if mode == "none":
        assert report["max_abs_diff"] < 1e-4  # fp32 differs from TF by summation order only
    if mode == "int8":
        assert ops.get("QUANTIZE", 0) >= 1 and report["max_abs_diff"] > 0  # really quantised


def test_quantized_modes_are_smaller_than_fp32(converted):
    sizes = {mode: len(tflite) for mode, tflite in converted.items()}
    assert sizes["fp16"] < 0.6 * sizes["none"]
    assert sizes["int8"] < 0.45 * sizes["none"]


def test_int8_without_representative_data_is_refused_before_conversion(student):
    with pytest.raises(ValueError, match="representative"):
        export.convert(student, "int8")


def test_export_int8_without_representative_data_writes_nothing(student_file, tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(export, "convert", lambda *a, **k: called.append(1))
    output = tmp_path / "out" / "student_int8.tflite"
    with pytest.raises(ValueError, match="--representative_data"):
        export.export_tflite(student_file, "int8", output=output)
    assert called == []
    assert not output.exists()


def test_unknown_mode_is_refused(student):
    with pytest.raises(ValueError, match="int4"):
        export.convert(student, "int4")


def test_forbidden_ops_names_custom_and_flex_ops():
    names = ["CONV_2D", "CUSTOM:FlexMatrixDeterminant", "ADD", "CUSTOM:Erfinv"]
    assert export.forbidden_ops(names) == ["CUSTOM:Erfinv", "CUSTOM:FlexMatrixDeterminant"]
    assert export.forbidden_ops(["CONV_2D", "RESIZE_BILINEAR", "LOGISTIC"]) == []


def _function_model(fn, select_tf_ops=False):
    function = tf.function(fn, input_signature=[tf.TensorSpec([1, 8, 8, 1], tf.float32)], autograph=False)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()])
    converter.allow_custom_ops = True
    if select_tf_ops:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    return converter.convert()


def test_list_ops_reads_flex_and_custom_ops_from_the_flatbuffer():
    flex = _function_model(lambda x: tf.reshape(tf.linalg.det(tf.reshape(x, [1, 8, 8])), [1, 1, 1, 1]),
                           select_tf_ops=True)
    custom = _function_model(tf.math.erfinv)
    assert "CUSTOM:FlexMatrixDeterminant" in export.list_ops(flex)
    assert export.list_ops(custom) == {"CUSTOM:Erfinv": 1}


def test_verify_rejects_a_model_with_a_flex_op(student, images):
    flex = _function_model(lambda x: tf.reshape(tf.linalg.det(tf.reshape(x, [1, 8, 8])), [1, 1, 1, 1]),
                           select_tf_ops=True)
    with pytest.raises(export.ExportError, match="FlexMatrixDeterminant"):
        export.verify(flex, student, images, mode="none")


def test_verify_rejects_outputs_that_differ_from_keras(student, converted, images):
    changed = keras.models.clone_model(student)
    changed.set_weights(student.get_weights())
    head = changed.get_layer("head_bn")
    gamma, beta, mean, variance = head.get_weights()
    head.set_weights([gamma, beta + 1.0, mean, variance])  # Keras now predicts deeper scenes
    with pytest.raises(export.ExportError, match="mean_relative_diff"):
        export.verify(converted["none"], changed, images, mode="none")


def test_metrics_are_compared_at_the_truths_own_size_by_evaluate(student, converted, data_dir):
    from mdekd.evaluate import evaluate_model

    metrics = export.compare_metrics(converted["fp16"], student, data_dir, "synthetic", mode="fp16",
                                     num_images=3, num_threads=1)
    keras_metrics, tflite_metrics = metrics["keras"], metrics["tflite"]
    assert keras_metrics == evaluate_model(student, data_dir, "synthetic", max_images=3)["metrics"]
    assert keras_metrics["abs_rel"] > 0.1  # an untrained model is far from the truth ...
    assert abs(tflite_metrics["abs_rel"] - keras_metrics["abs_rel"]) < 1e-3  # ... the same way


def test_metrics_drift_beyond_the_tolerance_is_refused(student, converted, data_dir):
    changed = keras.models.clone_model(student)
    changed.set_weights(student.get_weights())
    head = changed.get_layer("head_bn")
    gamma, beta, mean, variance = head.get_weights()
    head.set_weights([gamma, beta + 1.0, mean, variance])
    with pytest.raises(export.ExportError, match="abs_rel drift"):
        export.compare_metrics(converted["none"], changed, data_dir, "synthetic", num_images=3,
                               num_threads=1)


def test_export_writes_model_and_report_after_verification(student_file, data_dir, tmp_path):
    output = tmp_path / "exported" / "student_int8.tflite"
    report = export.export_tflite(student_file, "int8", output=output, representative_data=data_dir,
                                  dataset="synthetic", validation_data=data_dir, num_threads=1,
                                  progress=False, log=lambda *a: None)
    assert output.is_file() and output.stat().st_size == report["tflite_bytes"]
    saved = json.loads((tmp_path / "exported" / "student_int8.tflite.json").read_text())
    assert saved["mode"] == "int8"
    assert saved["input_shape"] == [*SIZE, 3]
    assert saved["source_model"] == str(student_file)
    assert saved["calibration"]["num_images"] == 6
    assert saved["metrics"]["keras"]["si_rmse"] > 0
    assert "timestamp" in saved and export.forbidden_ops(saved["ops"]) == []
    assert sorted(os.listdir(tmp_path / "exported")) == ["student_int8.tflite", "student_int8.tflite.json"]


def test_failed_verification_leaves_no_file_and_no_temp(student_file, converted, tmp_path, monkeypatch):
    def failing_verify(*args, **kwargs):
        raise export.ExportError("mean_relative_diff 0.5 > 0.1; nothing was written")

    monkeypatch.setattr(export, "convert", lambda *args, **kwargs: converted["none"])
    monkeypatch.setattr(export, "verify", failing_verify)
    out_dir = tmp_path / "exported"
    with pytest.raises(export.ExportError):
        export.export_tflite(student_file, "none", output=out_dir / "m.tflite", log=lambda *a: None)
    assert list(out_dir.iterdir()) == []


def test_missing_model_file_is_named(tmp_path):
    missing = tmp_path / "nope.keras"
    with pytest.raises(FileNotFoundError, match="nope.keras"):
        export.export_tflite(missing, "none", output=tmp_path / "m.tflite")


def test_corrupt_model_file_is_named(tmp_path):
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="corrupt.keras"):
        export.export_tflite(corrupt, "none", output=tmp_path / "m.tflite")


def test_unregistered_custom_layer_asks_to_import_mdekd(student_file, monkeypatch):
    registered = keras.saving.get_custom_objects()
    for key in [k for k in registered if k.startswith("mdekd>")]:
        monkeypatch.delitem(registered, key)  # as in a process that never imported mdekd.models
    with pytest.raises(ValueError, match="import mdekd"):
        export.export_tflite(student_file, "none")


def test_unwritable_output_folder_is_refused_before_conversion(student_file, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="--output: cannot write to .*a_file"):
        export.export_tflite(student_file, "none", output=blocker / "m.tflite")


def test_empty_calibration_folder_is_refused(student_file, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        export.export_tflite(student_file, "int8", output=tmp_path / "m.tflite", representative_data=empty)


def test_calibration_file_that_is_not_an_image_is_named_before_conversion(student_file, tmp_path, monkeypatch):
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    (calibration / "broken.png").write_text("not an image")
    output = tmp_path / "m.tflite"
    monkeypatch.setattr(export, "convert", lambda *args, **kwargs: pytest.fail("converted"))
    with pytest.raises(ValueError, match="broken.png"):
        export.export_tflite(student_file, "int8", output=output, representative_data=calibration,
                             progress=False, log=lambda *a: None)
    assert not output.exists()


def _run_cli(*args, cwd=REPO_ROOT):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "export.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_rejects_an_unknown_quantize_mode():
    result = _run_cli("--quantize", "int4")
    assert result.returncode != 0
    assert "int4" in result.stderr and "dynamic" in result.stderr


def test_cli_without_model_exports_the_newest_student_beside_it(student_file, data_dir, tmp_path):
    run = tmp_path / "runs" / "student_a"
    run.mkdir(parents=True)
    (run / "best.keras").write_bytes(student_file.read_bytes())
    (run / "run.json").write_text(json.dumps(
        {"mode": "student", "input_shape": [*SIZE, 3], "data_dir": str(data_dir), "dataset": "synthetic"}))
    result = _run_cli("--quantize", "fp16", "--num_threads", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "runs/student_a/best.keras" in result.stdout
    report = json.loads((run / "student_fp16.tflite.json").read_text())
    assert report["mode"] == "fp16" and "validation" in report["verification_data"]
    assert (run / "student_fp16.tflite").stat().st_size == report["tflite_bytes"]


def test_relative_errors_are_per_pixel_so_far_and_near_pixels_weigh_alike():
    keras_depth = np.array([1.0, 10.0, 10.0, 10.0])
    tflite_depth = np.array([1.1, 11.0, 10.0, 10.0])  # both first pixels off by 10 %
    errors = export.relative_errors(keras_depth, tflite_depth)
    assert errors["max_relative_diff"] == pytest.approx(0.1)
    assert errors["mean_relative_diff"] == pytest.approx(0.05)
    assert errors["max_abs_diff"] == pytest.approx(1.0)


def test_the_default_student_is_reported_gpu_delegate_compatible(converted):
    for mode in ("none", "int8"):
        verdict = export.gpu_delegate_compatibility(converted[mode])
        assert verdict == {"compatible": True, "summary": "GPU delegate: compatible", "issues": []}


def test_gpu_delegate_issues_reported_by_the_analyzer_are_named(converted, monkeypatch):
    # This TF build's analyzer flagged none of ARG_MAX, GATHER, CUMSUM, 2-D SLICE (toolchain.md
    # §20), so its warning format is replayed here to test that warnings become the verdict.
    def analyze(model_content=None, gpu_compatibility=False):
        print("Op#3 ARG_MAX(T#2) -> [T#4]\nGPU COMPATIBILITY WARNING: Not supported op ARG_MAX")

    monkeypatch.setattr(tf.lite.experimental.Analyzer, "analyze", staticmethod(analyze))
    verdict = export.gpu_delegate_compatibility(converted["none"])
    assert not verdict["compatible"]
    assert verdict["summary"] == "GPU delegate: GPU COMPATIBILITY WARNING: Not supported op ARG_MAX"


def test_exported_signature_reads_image_and_returns_depth(converted):
    from ai_edge_litert.interpreter import Interpreter

    for mode in quantization.NAMES:
        signatures = Interpreter(model_content=converted[mode]).get_signature_list()
        assert signatures == {"serving_default": {"inputs": ["image"], "outputs": ["depth"]}}


def test_reduced_resolution_export_outputs_the_full_size(student_file, data_dir, tmp_path):
    output = tmp_path / "small.tflite"
    report = export.export_tflite(student_file, "int8", output=output, representative_data=data_dir,
                                  dataset="synthetic", validation_data=data_dir, input_size=(32, 32),
                                  num_threads=1, progress=False, log=lambda *a: None)
    assert report["input_shape"] == [*SIZE, 3] and report["network_input_size"] == [32, 32]
    from mdekd.tflite_runner import TFLiteRunner

    runner = TFLiteRunner(output, num_threads=1)
    assert runner.input_size == SIZE
    assert runner.predict(np.zeros((1, *SIZE, 3), np.float32)).shape == (1, *SIZE, 1)


@pytest.mark.parametrize("size, message", [((48, 64), "multiples of 32"), ((96, 64), "larger than")])
def test_bad_input_sizes_are_refused_naming_the_flag(student_file, tmp_path, size, message):
    with pytest.raises(ValueError, match=f"--input_size: .*{message}"):
        export.export_tflite(student_file, "none", output=tmp_path / "m.tflite", input_size=size,
                             log=lambda *a: None)
    assert not (tmp_path / "m.tflite").exists()


def test_a_model_that_is_not_a_depth_model_is_refused(tmp_path):
    image = keras.Input((32, 32, 3))
    path = tmp_path / "classifier.keras"
    keras.Model(image, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(image))).save(path)
    with pytest.raises(ValueError, match="not a depth model"):
        export.export_tflite(path, "none", output=tmp_path / "m.tflite", log=lambda *a: None)


def test_input_size_flag_must_be_two_integers():
    assert export.parse_input_size("256,320") == (256, 320)
    with pytest.raises(ValueError, match="--input_size: expected 'H,W'"):
        export.parse_input_size("240x320")
