"""Benchmarks: every --smoke mode runs and writes a table with all its rows; the pieces they share
compute what they claim. The three smoke runs go in parallel (their timings are not looked at)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from benchmark import common, latency, plot

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Run latency, throughput and accuracy --smoke at once; {name: (process result, output dir)}."""
    root = tmp_path_factory.mktemp("results")
    # Fewer variants than a plain --smoke where a row would only repeat a code path (each
    # conversion or traced train step costs seconds): the teacher is timed as Keras only, and the
    # distillation step (teacher and student networks, both trainers' code) stands for the two
    # direct ones; FastDepth with dual attention stands for the extra students and replaces the
    # nearest-upsampling rows (the nearest layer's conversion is tested in test_student.py; MobileViT
    # conversion in test_students.py).
    extra = {"latency": ["--teacher_variants", "keras", "--extra_students", "mobilenet+dual",
                         "--nocompare_upsampling"], "throughput": ["--configs", "distill,pipeline"],
             "accuracy": []}
    processes = {}
    for name in ("latency", "throughput", "accuracy"):
        out = root / name
        processes[name] = (subprocess.Popen(
            [sys.executable, "-m", f"benchmark.{name}", "--smoke", "--output_dir", str(out), *extra[name]],
            cwd=REPO_ROOT,
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)
    results = {}
    for name, (process, out) in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), out)
    return results


def _table_rows(markdown):
    return [line.split("|")[1:-1] for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| model") and not line.startswith("| config")
            and not line.startswith("| variant") and not line.startswith("| target")]


def test_latency_smoke_times_every_variant(smoke_runs):
    result, out = smoke_runs["latency"]
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((out / "latency.json").read_text())
    timed = {(r["model"], r["variant"]) for r in payload["results"]}
    assert timed == {("student", "keras"), ("student", "fp32"), ("student", "int8"),
                     ("teacher", "keras"), ("fastdepth_dual", "keras"),
                     ("fastdepth_dual", "fp32"), ("fastdepth_dual", "int8")}
    for r in payload["results"]:
        assert r["runs"] == 2 and r["median_ms"] > 0 and r["macs"] > 0 and r["size_bytes"] > 0
        assert r["gmacs_per_s"] == pytest.approx(r["macs"] / r["median_ms"] * 1e-6)
    teacher = next(r for r in payload["results"] if r["model"] == "teacher")
    student = next(r for r in payload["results"] if r["model"] == "student")
    assert teacher["params"] > 10 * student["params"]
    assert payload["sgemm_gmacs"]["1"] > 0
    assert [c["check"] for c in payload["targets"]] == [
        "int8 speed-up over fp32 TFLite", "fp32 TFLite speed-up over Keras", "fp32 TFLite fraction of sgemm GMAC/s"]
    table = (out / "latency.md").read_text()
    assert len([row for row in _table_rows(table) if row[1].strip() in latency.VARIANTS]) == 7


def test_throughput_smoke_measures_every_requested_configuration(smoke_runs):
    result, out = smoke_runs["throughput"]
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((out / "throughput.json").read_text())
    assert [r["config"] for r in payload["results"]] == ["distill", "pipeline"]
    for r in payload["results"]:
        assert r["images_per_s"] == pytest.approx(2 / (r["median_ms"] / 1e3))
        assert r["peak_rss_mb"] > 100  # a process that imported TensorFlow
    table = (out / "throughput.md").read_text()
    assert [row[0].strip() for row in _table_rows(table)] == ["distill", "pipeline"]


def test_accuracy_smoke_evaluates_keras_and_tflite_variants(smoke_runs):
    result, out = smoke_runs["accuracy"]
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((out / "accuracy.json").read_text())
    by_variant = {r["variant"]: r for r in payload["results"]}
    assert list(by_variant) == ["keras", "fp32", "int8"]
    keras_si = by_variant["keras"]["metrics"]["si_rmse"]
    assert by_variant["fp32"]["metrics"]["si_rmse"] == pytest.approx(keras_si, rel=1e-4)
    assert by_variant["int8"]["si_rmse_target"] == 0.02
    assert by_variant["int8"]["size_bytes"] < 0.5 * by_variant["fp32"]["size_bytes"]
    assert [row[0].strip() for row in _table_rows((out / "accuracy.md").read_text())] == ["keras", "fp32", "int8"]


def test_plot_draws_every_variant_of_the_smoke_results(smoke_runs, tmp_path):
    output = tmp_path / "plot.png"
    result = subprocess.run(
        [sys.executable, "-m", "benchmark.plot", "--latency_json", str(smoke_runs["latency"][1] / "latency.json"),
         "--accuracy_json", str(smoke_runs["accuracy"][1] / "accuracy.json"), "--output", str(output)],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    pixels = np.asarray(Image.open(output).convert("RGB"))
    assert pixels.shape == (plot.HEIGHT, plot.WIDTH, 3)
    for variant in ("keras", "fp32", "int8"):
        assert np.all(pixels == plot.COLOURS[variant], axis=-1).any(), variant


def test_int8_fidelity_smoke_compares_post_training_and_quantization_aware_int8(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmark.int8_fidelity", "--smoke", "--output_dir",
                             str(tmp_path)], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "int8_fidelity.json").read_text())
    by_variant = {r["variant"]: r for r in payload["results"]}
    assert list(by_variant) == ["int8", "qat", "qat_float_block1", "qat_float_stem"]
    # post-training int8 has no Keras model of its own: it is compared with the float one
    assert by_variant["int8"]["vs_own_keras"] == by_variant["int8"]["vs_float"]
    assert by_variant["qat_float_stem"]["float_layers"][0] == "conv1_relu"
    # keeping the stem float adds float ops between a DEQUANTIZE and a QUANTIZE
    assert by_variant["qat_float_stem"]["ops"]["DEQUANTIZE"] > by_variant["qat"]["ops"]["DEQUANTIZE"]
    assert all(r["latency_ms"] > 0 and r["speedup_vs_fp32"] > 0 for r in payload["results"])
    assert [row[0].strip() for row in _table_rows((tmp_path / "int8_fidelity.md").read_text())] == list(by_variant)


@pytest.mark.parametrize("name", ["latency", "throughput", "accuracy", "int8_fidelity", "plot"])
def test_every_benchmark_has_help_and_a_smoke_flag(name):
    result = subprocess.run([sys.executable, "-m", f"benchmark.{name}", "--help"], cwd=REPO_ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    # absl's --help prints the usage and exits with status 1
    assert "--smoke" in result.stdout and "--output" in result.stdout


def test_plot_smoke_writes_a_png(tmp_path):
    output = tmp_path / "sample.png"
    result = subprocess.run([sys.executable, "-m", "benchmark.plot", "--smoke", "--output", str(output)],
                            cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Image.open(output).size == (plot.WIDTH, plot.HEIGHT)


def test_timing_stats_median_and_p90():
    stats = common.timing_stats([0.001 * i for i in range(1, 11)])  # 1..10 ms
    assert stats["median_ms"] == pytest.approx(5.5)
    assert stats["p90_ms"] == pytest.approx(9.1)
    assert stats["min_ms"] == pytest.approx(1.0) and stats["runs"] == 10


def test_latency_targets_are_ratios_of_the_largest_thread_count():
    rows = [{"model": "student", "variant": v, "threads": t, "median_ms": ms, "macs": 4.5e9}
            for v, t, ms in [("keras", 2, 40.0), ("fp32", 2, 20.0), ("int8", 2, 5.0), ("fp32", 1, 100.0)]]
    results = latency.derive(rows, {1: 50.0, 2: 300.0})
    checks = {c["check"]: c for c in latency.check_targets(results)}
    assert checks["int8 speed-up over fp32 TFLite"]["value"] == pytest.approx(4.0)
    assert checks["fp32 TFLite speed-up over Keras"]["value"] == pytest.approx(2.0)
    fraction = checks["fp32 TFLite fraction of sgemm GMAC/s"]
    assert fraction["value"] == pytest.approx(4.5e9 / 0.020 / 1e9 / 300.0) and fraction["met"] is True
    assert all(c["threads"] == 2 for c in checks.values())


def test_plot_refuses_a_thread_count_that_was_not_measured():
    latency_payload = {"results": [{"model": "student", "variant": "fp32", "threads": 1, "median_ms": 5.0}]}
    accuracy_payload = {"results": [{"variant": "fp32", "metrics": {"si_rmse": 0.3}}]}
    points, threads = plot.collect_points(latency_payload, accuracy_payload)
    assert threads == 1 and points == [{"variant": "fp32", "latency_ms": 5.0, "si_rmse": 0.3}]
    with pytest.raises(ValueError, match="--threads 2"):
        plot.collect_points(latency_payload, accuracy_payload, threads=2)


def test_nice_ticks_cover_the_range_with_round_steps():
    ticks = plot.nice_ticks(0.2913, 0.3042)
    assert ticks[0] <= 0.2913 and ticks[-1] >= 0.3042
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0]) and 3 <= len(ticks) <= 8


def test_markdown_table_has_a_header_rule_and_one_line_per_row():
    table = common.markdown_table(["a", "b"], [[1, 2.5], ["x", None]])
    assert table.splitlines() == ["| a | b |", "|---|---:|", "| 1 | 2.5 |", "| x |  |"]


def test_batchnorm_statistics_are_set_from_the_images_and_momentum_restored():
    import keras

    image = keras.Input((8, 8, 3))
    norm = keras.layers.BatchNormalization(momentum=0.9)
    model = keras.Model(image, norm(keras.layers.Conv2D(4, 3, padding="same")(image)))
    images = np.random.default_rng(0).uniform(0, 5, (6, 8, 8, 3)).astype(np.float32)
    latency.estimate_batchnorm_statistics(model, images)
    normalised = model(images, training=False).numpy()  # γ = 1, β = 0 at initialisation
    np.testing.assert_allclose(normalised.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(normalised.var(axis=(0, 1, 2)), 1.0, rtol=1e-2)
    assert norm.momentum == 0.9


def test_resolution_study_exports_each_network_size_at_the_camera_size(tmp_path):
    import keras

    from benchmark import resolution
    from mdekd.data.synthetic import generate_dataset
    from mdekd.models import build_student

    keras.utils.set_random_seed(0)
    build_student((64, 64, 3), alpha=0.25).save(tmp_path / "student.keras")
    data = generate_dataset(tmp_path / "scenes", train=3, validation=2, height=96, width=96, seed=0,
                            workers=1, progress=False)
    payload = resolution.benchmark_resolution(tmp_path / "student.keras", data, "synthetic", (96, 96),
                                              [(96, 96), (64, 64)], threads=1, runs=2, num_calibration=3,
                                              output_dir=tmp_path / "out", log=lambda *a: None)
    rows = [(tuple(r["network_size"]), r["mode"]) for r in payload["results"]]
    assert rows == [((96, 96), "none"), ((96, 96), "int8"), ((64, 64), "none"), ((64, 64), "int8")]
    assert all(r["metrics"]["si_rmse"] > 0 and r["median_ms"] > 0 for r in payload["results"])
    assert (tmp_path / "out" / "resolution.md").read_text().count("| 64x64 |") == 2
    assert resolution.parse_sizes("480x640,240x320") == [(480, 640), (240, 320)]


def test_stage_profile_cuts_the_deployed_student_after_every_decoder_step():
    import keras

    from benchmark import stage_profile
    from mdekd.models import build_student, deploy_model

    keras.utils.set_random_seed(0)
    network = deploy_model(build_student((64, 64, 3), alpha=0.25))
    stages = [stage for stage, _ in stage_profile.stage_cuts(network)]
    steps = ["5×5 depthwise + BN + ReLU", "1×1 conv + BN + ReLU"]
    expected = ["encoder"]
    for i in range(1, 6):
        expected += [f"decode{i} {step}" for step in steps]
        if i < 5:  # the deployed graph moves the last upsampling behind the head
            expected.append(f"decode{i} ×2 upsampling")
        if i in (2, 3, 4):
            expected.append(f"decode{i} skip addition")
    assert stages == expected + ["head: 1×1 conv + BN", "tail: upsampling + positive depth"]
    assert stage_profile.stage_cuts(network)[-1][1] is network.output


def test_stage_costs_are_differences_of_nested_prefixes_and_sum_to_the_whole():
    from benchmark import stage_profile

    costs = stage_profile.stage_costs([10.0, 12.5, 12.0, 20.0])
    np.testing.assert_allclose(costs, [10.0, 2.5, -0.5, 8.0])
    assert costs.sum() == pytest.approx(20.0)


def test_plot_takes_one_point_per_network_size_and_mode_of_the_resolution_study():
    payload = {"results": [
        {"network_size": [96, 128], "mode": "none", "median_ms": 30.0, "metrics": {"si_rmse": 0.31}},
        {"network_size": [96, 128], "mode": "int8", "median_ms": 12.0, "metrics": {"si_rmse": 0.32}}]}
    assert plot.resolution_points(payload) == [
        {"variant": "fp32", "label": "96x128", "latency_ms": 30.0, "si_rmse": 0.31},
        {"variant": "int8", "label": "96x128", "latency_ms": 12.0, "si_rmse": 0.32}]


def test_interleaved_timing_warms_up_each_runner_once_and_times_each_in_turn():
    calls = []

    class Runner:
        def __init__(self, name):
            self.name = name

        def run_one(self, image):
            calls.append(self.name)

    timings = common.time_interleaved({"a": Runner("a"), "b": Runner("b")}, image=None, runs=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert {key: len(seconds) for key, seconds in timings.items()} == {"a": 2, "b": 2}
    assert all(s >= 0 for seconds in timings.values() for s in seconds)


def test_export_students_reads_its_student_list_and_refuses_an_unregistered_one():
    from absl import app

    from benchmark import export_students

    assert export_students.parse_students("mobilenet, mobilevit_xs+dual") == [("mobilenet", None),
                                                                                ("mobilevit_xs", "dual")]
    with pytest.raises(app.UsageError, match="--students: unknown 'axial'; registered: dual"):
        export_students.parse_students("mobilenet+axial")
