"""Synthetic scenes: exact metric depth, determinism, the MAI2021 files and the CLI (design.md §3)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mdekd.constants import MAX_DEPTH, MIN_DEPTH
from mdekd.data import synthetic
from mdekd.data.stats import describe_dataset, format_description
from mdekd.data.synthetic import generate_dataset, main, render_scene

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 32, 48


def _files(root):
    root = pathlib.Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ the ray caster

def test_ray_parameter_is_z_depth():
    camera = {"yaw": 0.4, "pitch": -0.2, "roll": 0.05, "position": np.zeros(3)}
    directions = synthetic._camera_rays(camera, 4, 6, focal=5.0)
    forward = np.array([math.sin(0.4) * math.cos(-0.2), math.sin(-0.2), math.cos(0.4) * math.cos(-0.2)])
    # every ray's component along the optical axis is 1, so origin + t * direction lies at z = t
    np.testing.assert_allclose(directions @ forward, 1.0, atol=1e-12)


def test_box_and_sphere_hits_are_exact():
    origin = np.array([0.0, 1.0, 0.0])
    directions = np.array([[0.0, 0.0, 1.0], [0.1, 0.0, 1.0], [0.0, 0.0, -1.0]])  # z-component 1
    rows = synthetic._components(directions)
    t, hit, entry = synthetic._hit_box(origin, synthetic._inverse(rows), [-1.0, 0.0, 5.0], [1.0, 2.0, 6.0])
    np.testing.assert_array_equal(hit, [True, True, False])
    np.testing.assert_allclose(t[:2], [5.0, 5.0])
    np.testing.assert_array_equal(entry[:2], [2, 2])
    t, hit = synthetic._hit_sphere(origin, rows, np.array([0.0, 1.0, 10.0]), 2.0)
    assert hit[0] and not hit[2]
    assert t[0] == pytest.approx(8.0)


def test_render_scene_shapes_dtypes_and_depth_range():
    rgb, depth = render_scene(0, HEIGHT, WIDTH)
    assert rgb.shape == (HEIGHT, WIDTH, 3) and rgb.dtype == np.uint8
    assert depth.shape == (HEIGHT, WIDTH) and depth.dtype == np.float32
    valid = depth > 0
    assert np.all(depth[valid] > MIN_DEPTH) and np.all(depth[valid] <= MAX_DEPTH)


def test_render_scene_is_deterministic_for_a_seed():
    a, b, c = render_scene(3, HEIGHT, WIDTH), render_scene(3, HEIGHT, WIDTH), render_scene(4, HEIGHT, WIDTH)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_scenes_are_textured_with_varied_depth_and_sky_is_invalid():
    frames = [render_scene(seed, 48, 64) for seed in range(8)]
    for rgb, depth in frames:
        assert rgb.astype(np.float32).std() > 10  # not a flat picture
        assert len(np.unique(depth[depth > 0])) > 500  # planes and objects, not a few constant layers
    # outdoor frames show sky (invalid, 0); rooms are closed, fully valid
    assert any((depth == 0).any() for _, depth in frames)
    assert any((depth > 0).all() for _, depth in frames)


# ------------------------------------------------------------------ dataset files

@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """2 + 1 frames at 32x48, written by the CLI with 2 worker processes."""
    output = tmp_path_factory.mktemp("synthetic") / "set"
    result = subprocess.run(
        [sys.executable, "-m", "mdekd.data.synthetic", "--output", str(output), "--train", "2", "--validation", "1",
         "--height", str(HEIGHT), "--width", str(WIDTH), "--seed", "5", "--workers", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr
    return output, result.stdout


def test_cli_writes_mai2021_layout_and_prints_statistics(tiny_dataset):
    output, stdout = tiny_dataset
    assert sorted(_files(output)) == [
        "synthetic.json", "train/depth/000000.png", "train/depth/000001.png", "train/rgb/000000.png",
        "train/rgb/000001.png", "validation/depth/000000.png", "validation/rgb/000000.png"]
    assert "train: 2 pairs 32x48" in stdout and "validation: 1 pairs 32x48" in stdout
    assert not output.with_name(output.name + ".partial").exists()


def test_files_are_independent_of_worker_count(tiny_dataset, tmp_path):
    output, _ = tiny_dataset
    again = generate_dataset(tmp_path / "one_worker", 2, 1, HEIGHT, WIDTH, seed=5, workers=1, progress=False)
    assert _files(again) == _files(output)  # byte-identical


def test_written_depth_is_uint16_millimetres_of_the_rendered_depth(tiny_dataset):
    from mdekd.data import read_depth_png, read_rgb

    output, _ = tiny_dataset
    rgb, depth = render_scene(synthetic.frame_seed(5, "validation", 0), HEIGHT, WIDTH)
    np.testing.assert_array_equal(read_rgb(output / "validation/rgb/000000.png"), rgb / np.float32(255))
    stored = read_depth_png(output / "validation/depth/000000.png", 1e-3)[..., 0]
    assert np.abs(stored - depth).max() <= 0.0005 + 1e-6  # rounded to the millimetre
    np.testing.assert_array_equal(stored == 0, depth == 0)


def test_loader_reads_the_synthetic_set(tiny_dataset):
    from mdekd.data import build_dataset

    output, _ = tiny_dataset
    images, depths = next(iter(build_dataset(output, "train", "synthetic", batch_size=2)))
    assert images.shape == (2, HEIGHT, WIDTH, 3) and depths.shape == (2, HEIGHT, WIDTH, 1)
    assert float(depths.numpy().max()) <= MAX_DEPTH and float(depths.numpy().max()) > 0


def test_describe_dataset_counts_and_ranges(tiny_dataset):
    output, _ = tiny_dataset
    description = describe_dataset(output, "synthetic")
    assert description["train"]["count"] == 2 and description["validation"]["count"] == 1
    for split in description.values():
        assert MIN_DEPTH < split["depth_min"] <= split["depth_median"] <= split["depth_max"] <= MAX_DEPTH
        assert 0 < split["valid_fraction"] <= 1
        assert all(0 < c < 1 for c in split["image_mean"])
    assert format_description(description).startswith("train: 2 pairs 32x48, depth ")


def test_complete_dataset_is_reused_without_rewriting(tiny_dataset):
    output, _ = tiny_dataset
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*.png")}
    assert generate_dataset(output, 2, 1, HEIGHT, WIDTH, seed=5, progress=False) == output
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*.png")} == before


def test_existing_different_output_is_refused_unless_overwrite(tmp_path):
    output = generate_dataset(tmp_path / "set", 1, 0, 8, 8, seed=0, workers=1, progress=False)
    with pytest.raises(FileExistsError, match=r"--output .*set exists.*--overwrite"):
        generate_dataset(output, 1, 0, 8, 8, seed=1, workers=1, progress=False)
    generate_dataset(output, 1, 0, 8, 8, seed=1, workers=1, progress=False, overwrite=True)
    assert json.loads((output / "synthetic.json").read_text())["seed"] == 1
    assert not list(tmp_path.glob("set.*"))  # no partial or stale folder left behind


def test_interrupted_run_leaves_no_output_and_resumes(tmp_path, monkeypatch):
    real = synthetic._render_and_write
    rendered = []

    def interrupt_on_third(task):
        if len(rendered) == 2:
            raise KeyboardInterrupt
        real(task)
        rendered.append(task)

    monkeypatch.setattr(synthetic, "_render_and_write", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "set", 3, 1, 8, 8, seed=2, workers=1, progress=False)
    assert not (tmp_path / "set").exists()  # nothing half-written under the final name

    resumed_tasks = []
    monkeypatch.setattr(synthetic, "_render_and_write", lambda task: (resumed_tasks.append(task), real(task)))
    resumed = generate_dataset(tmp_path / "set", 3, 1, 8, 8, seed=2, workers=1, progress=False)
    assert len(resumed_tasks) == 2  # only the two frames the interrupted run had not written
    monkeypatch.setattr(synthetic, "_render_and_write", real)
    fresh = generate_dataset(tmp_path / "fresh", 3, 1, 8, 8, seed=2, workers=1, progress=False)
    assert _files(resumed) == _files(fresh)


def test_cli_help_and_bad_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--validation" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--output", "unused", "--train", "-1"])
    assert exit_info.value.code == 2 and "--train must be >= 0" in capsys.readouterr().err
