"""mdekd.pseudo_label: any depth model labels photos into the MAI2021 layout that training reads."""

import keras
import numpy as np
import pytest
from PIL import Image

from mdekd.data import build_dataset, list_pairs, read_depth_png
from mdekd.models import build_student, inference_model
from mdekd.predict import predict_depth
from mdekd.pseudo_label import pseudo_label

SIZES = {"a.png": (48, 80), "nested/b.jpg": (70, 50), "nested/deeper/c.png": (64, 64)}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    keras.utils.set_random_seed(3)
    path = tmp_path_factory.mktemp("teacher") / "teacher.keras"
    build_student((64, 64, 3), alpha=0.25).save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for name, (height, width) in SIZES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / name)
    return root


def test_pseudo_labels_round_trip_through_the_mai2021_loader_at_each_image_size(teacher_file, photos, tmp_path):
    out = tmp_path / "labels"
    assert pseudo_label(str(teacher_file), photos, out, progress=False) == 3
    pairs = list_pairs(out, "train", "mai2021")
    assert len(pairs) == 3
    for rgb, depth_file in pairs:
        relative = rgb.split("/train/rgb/")[1]
        depth = read_depth_png(depth_file, 1e-3)
        assert depth.shape[:2] == SIZES[relative]
        image = np.asarray(Image.open(rgb).convert("RGB"), np.float32) / 255.0
        expected = predict_depth(str(teacher_file), image)
        np.testing.assert_allclose(depth[..., 0], expected, atol=6e-4)  # 1 mm rounding
    batch = next(iter(build_dataset(out, "train", "mai2021", batch_size=3, image_size=(32, 32),
                                    shuffle=False)))
    assert batch[1].shape == (3, 32, 32, 1) and float(np.min(batch[1])) > 0


def test_pseudo_labelling_resumes_where_it_stopped(teacher_file, photos, tmp_path):
    out = tmp_path / "labels"
    pseudo_label(str(teacher_file), photos, out, progress=False)
    assert pseudo_label(str(teacher_file), photos, out, progress=False) == 0
    (out / "train" / "depth" / "nested" / "b.png").unlink()
    assert pseudo_label(str(teacher_file), photos, out, progress=False) == 1


def test_a_tflite_model_can_teach(teacher_file, photos, tmp_path):
    import tensorflow as tf

    model = keras.models.load_model(teacher_file)
    tflite = tmp_path / "teacher.tflite"
    tflite.write_bytes(tf.lite.TFLiteConverter.from_keras_model(inference_model(model)).convert())
    out = tmp_path / "labels"
    assert pseudo_label(str(tflite), photos, out, progress=False) == 3
    depth = read_depth_png(out / "train" / "depth" / "a.png", 1e-3)
    keras_labels = tmp_path / "keras_labels"
    pseudo_label(str(teacher_file), photos, keras_labels, progress=False)
    np.testing.assert_allclose(depth, read_depth_png(keras_labels / "train" / "depth" / "a.png", 1e-3),
                               atol=2e-3)


def test_output_inside_the_input_is_refused(teacher_file, photos):
    with pytest.raises(ValueError, match="inside --input"):
        pseudo_label(str(teacher_file), photos, photos / "labels", progress=False)


def test_input_without_images_is_refused(teacher_file, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--input.*holds no image"):
        pseudo_label(str(teacher_file), tmp_path / "empty", tmp_path / "out", progress=False)


def test_output_that_is_a_file_is_refused(teacher_file, photos, tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(PermissionError, match="--output: cannot write to .*is a file"):
        pseudo_label(str(teacher_file), photos, tmp_path / "out", progress=False)


def test_cli_reports_a_missing_input_in_one_line(teacher_file, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mdekd.pseudo_label", f"--teacher={teacher_file}",
                             f"--input={tmp_path / 'none'}", f"--output={tmp_path / 'out'}"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"pseudo_label: error: --input: folder not found: {tmp_path / 'none'}")
