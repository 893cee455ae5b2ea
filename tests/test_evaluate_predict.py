"""Evaluation over a dataset (Keras and TFLite alike) and prediction on images of any size."""

import json
import math
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from mdekd import export
from mdekd.colormap import colorize_depth, turbo
from mdekd.data import list_pairs, read_depth_png
from mdekd.data.synthetic import generate_dataset
from mdekd.evaluate import evaluate_model
from mdekd.metrics import depth_metrics
from mdekd.models import build_student
from mdekd.predict import depth_panel, depth_to_uint16_mm, predict_depth, predict_files

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = (64, 64)
CONSTANT_DEPTH = 2.0  # metres


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("data") / "synthetic", train=0, validation=4,
                            height=SIZE[0], width=SIZE[1], seed=0, workers=1, progress=False)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """The same tiny student as .keras and as fp32 .tflite."""
    keras.utils.set_random_seed(0)
    student = build_student((*SIZE, 3), alpha=0.25)
    folder = tmp_path_factory.mktemp("models")
    student.save(folder / "student.keras")
    (folder / "student.tflite").write_bytes(export.convert(student, "none"))
    return folder / "student.keras", folder / "student.tflite"


def constant_depth_model(size=SIZE):
    """Predicts CONSTANT_DEPTH metres everywhere, whatever the image (a 1×1 conv with bias only)."""
    image = keras.Input((*size, 3))
    depth = keras.layers.Conv2D(1, 1, kernel_initializer="zeros",
                                bias_initializer=keras.initializers.Constant(CONSTANT_DEPTH))(image)
    return keras.Model(image, depth)


def test_keras_and_tflite_models_give_the_same_metrics(model_files, data_dir):
    keras_file, tflite_file = model_files
    from_keras = evaluate_model(keras_file, data_dir, "synthetic", "validation", batch_size=3)
    from_tflite = evaluate_model(tflite_file, data_dir, "synthetic", "validation", num_threads=1)
    assert from_keras["format"] == "keras" and from_tflite["format"] == "tflite"
    assert from_keras["num_images"] == from_tflite["num_images"] == 4
    for name, value in from_keras["metrics"].items():
        assert math.isfinite(value)
        assert from_tflite["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_metrics_are_computed_on_the_full_resolution_truth(tmp_path):
    # Truth at 96×128, model at 64×64: the prediction is resized to the truth, not the reverse.
    root = generate_dataset(tmp_path / "large", train=0, validation=3, height=96, width=128, seed=1,
                            workers=1, progress=False)
    result = evaluate_model(constant_depth_model(), root, "synthetic", "validation")
    truths = np.stack([read_depth_png(d, 1e-3) for _, d in list_pairs(root, "validation", "synthetic")])
    expected = depth_metrics(truths, np.full_like(truths, CONSTANT_DEPTH))
    assert result["input_size"] == [*SIZE]
    for name, value in expected.items():
        assert result["metrics"][name] == pytest.approx(value, rel=1e-5), name


def test_evaluate_cli_prints_a_table_and_writes_json(model_files, data_dir, tmp_path):
    output = tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, "-m", "mdekd.evaluate", "--model", str(model_files[1]), "--data_dir", str(data_dir),
         "--dataset", "synthetic", "--json", str(output), "--num_threads", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr
    assert "| student.tflite |" in result.stdout and "si_rmse" in result.stdout
    saved = json.loads(output.read_text())
    assert saved["num_images"] == 4 and saved["format"] == "tflite"
    assert saved["metrics"]["si_rmse"] > 0


def test_predict_keeps_the_input_size_and_writes_millimetres(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (500, 741, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    truth_dir = tmp_path / "truth"
    truth_dir.mkdir()
    truth = rng.integers(500, 9000, (500, 741)).astype(np.uint16)
    truth[:50] = 0  # invalid band
    Image.fromarray(truth).save(truth_dir / "photo.png")

    [written] = predict_files(constant_depth_model(), tmp_path / "photo.png", tmp_path / "out",
                              depth_dir=truth_dir, log=lambda *a: None)
    depth = np.asarray(Image.open(written["files"]["depth"]))
    assert depth.dtype == np.uint16 and depth.shape == (500, 741)
    assert np.all(depth == CONSTANT_DEPTH * 1000)
    colour = Image.open(written["files"]["color"])
    assert colour.mode == "RGB" and colour.size == (741, 500)
    panel = np.asarray(Image.open(written["files"]["panel"]))
    assert panel.shape == (500, 4 * 741, 3)
    assert np.all(panel[:50, 741:2 * 741] == 0)  # no truth there: black truth panel ...
    assert np.all(panel[:50, 3 * 741:] == 0)  # ... and black error panel


def test_predict_depth_resizes_back_to_any_image_size(model_files):
    image = np.random.default_rng(0).random((100, 150, 3), dtype=np.float32)
    depth = predict_depth(str(model_files[1]), image)
    assert depth.shape == (100, 150)
    assert np.all(depth > 0)


def test_depth_png_values_are_rounded_millimetres_clipped_to_uint16():
    depth = np.array([[70.0, -1.0, np.nan, 1.2346, 0.0]])
    np.testing.assert_array_equal(depth_to_uint16_mm(depth), [[65535, 0, 0, 1235, 0]])


def test_missing_truth_file_is_named(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "truth").mkdir()
    with pytest.raises(FileNotFoundError, match="a.png"):
        predict_files(constant_depth_model(), tmp_path / "a.png", tmp_path / "out",
                      depth_dir=tmp_path / "truth", log=lambda *a: None)


def test_predict_pairs_truth_by_the_datasets_naming_rule(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "rgb_00007.jpg")
    (tmp_path / "truth").mkdir()
    Image.fromarray(np.full((32, 32), 2000, np.uint16)).save(tmp_path / "truth" / "sync_depth_00007.png")
    [written] = predict_files(constant_depth_model(), tmp_path / "rgb_00007.jpg", tmp_path / "out",
                              depth_dir=tmp_path / "truth", dataset="nyu", log=lambda *a: None)
    assert pathlib.Path(written["files"]["panel"]).is_file()


def test_predict_refuses_an_output_path_that_is_a_file_naming_it(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "out").write_text("a file")
    with pytest.raises(PermissionError, match="--output: cannot write to .*out"):
        predict_files(constant_depth_model(), tmp_path / "a.png", tmp_path / "out", log=lambda *a: None)


def test_colour_map_is_red_near_blue_far_and_black_where_invalid():
    colours = colorize_depth(np.array([[1.0, 8.0, 0.0]]), low=1.0, high=10.0)
    near, far, invalid = colours[0]
    assert near[0] > near[2] and far[2] > far[0]
    assert invalid.tolist() == [0, 0, 0]


def test_turbo_ends_are_dark_blue_and_dark_red():
    start, end = turbo(np.array([0.0, 1.0]))
    assert start[2] > start[1] and end[0] > 100 and end[0] > 5 * end[2]


def test_panel_starts_with_the_rgb_image():
    image = np.random.default_rng(0).random((8, 10, 3), dtype=np.float32)
    truth = np.full((8, 10), 3.0, np.float32)
    panel = depth_panel(image, truth, truth * 1.1)
    assert panel.shape == (8, 40, 3)
    np.testing.assert_array_equal(panel[:, :10], np.round(image * 255).astype(np.uint8))


def test_median_scaling_makes_a_scaled_prediction_exact(data_dir):
    # A constant prediction is not exact, but scaling by the median makes rmse that of
    # median(truth) — and si_rmse, scale-invariant, must not move.
    result = evaluate_model(constant_depth_model(), data_dir, "synthetic", "validation", median_scaling=True)
    raw, scaled = result["metrics"], result["median_scaled_metrics"]
    assert scaled["si_rmse"] == pytest.approx(raw["si_rmse"], rel=1e-5)
    truths = [read_depth_png(d, 1e-3) for _, d in list_pairs(data_dir, "validation", "synthetic")]
    expected = depth_metrics(np.stack(truths), np.stack([np.full_like(t, np.median(t[t > 0])) for t in truths]))
    assert scaled["rmse"] == pytest.approx(expected["rmse"], rel=1e-5)


def test_evaluation_refuses_a_pair_of_different_sizes_naming_both_files(tmp_path):
    root = generate_dataset(tmp_path / "pairs", train=0, validation=2, height=64, width=64, seed=2,
                            workers=1, progress=False)
    rgb, depth = list_pairs(root, "validation", "synthetic")[1]
    Image.open(rgb).resize((80, 48)).save(rgb)
    with pytest.raises(ValueError, match=r"RGB .*000001.png is 80x48 but its depth .*000001.png is 64x64"):
        evaluate_model(constant_depth_model(), root, "synthetic", "validation")
