"""int8 fidelity and speed of a trained student: post-training int8 vs the quantisation-aware models.

    python -m benchmark.int8_fidelity --model runs/x/best.keras --data_dir data/quickstart
    python -m benchmark.int8_fidelity --smoke        # tiny random student (benchmark.accuracy's)

Variants (rows): ``int8`` (post-training, ``export.convert``), ``qat`` (``mdekd.quantization_aware``:
calibrated, the input stage float), ``qat_float_block1`` and ``qat_float_stem`` (also FastDepth's
first block, or first two blocks, float: ``FLOAT_BLOCK1``, ``FLOAT_STEM``). Each is compared per pixel with the float Keras student and with its own
Keras model (for the QAT rows: the quantisation-aware model itself), scored on the validation split
(si-RMSE, mdekd.evaluate), and timed against fp32 at ``--latency_size`` (the same weights rebuilt
for that input; interleaved runs, so the ratio is of one run). Targets (phone-path issue, trained
student at 128×160): mean <= 1.5 %, p99 <= 6 %, si-RMSE <= +0.5 %; int8 >= 2.5× fp32.
"""

import os

import numpy as np
from absl import app, flags

from benchmark import common
from mdekd.cli import command
from mdekd.tflite_runner import DEFAULT_NUM_THREADS

FLAGS = flags.FLAGS

# FastDepth's stem and first blocks, the layers whose rounding reaches the depth most (README,
# phone path: leave-one-out sensitivity of each int8 tensor). A float tensor also makes the op that
# reads it float: FLOAT_BLOCK1 runs conv1 (float anyway), block 1's depthwise and pointwise in float.
FLOAT_BLOCK1 = ("conv1_relu", "conv_dw_1_relu")
FLOAT_STEM = ("conv1_relu", "conv_dw_1_relu", "conv_pw_1_relu", "conv_dw_2_relu", "conv_pw_2_relu")
# name -> float_layers (None: post-training int8)
VARIANTS = {"int8": None, "qat": (), "qat_float_block1": FLOAT_BLOCK1, "qat_float_stem": FLOAT_STEM}
TARGETS = {"mean": 0.015, "p99": 0.06, "si_rmse_change": 0.005, "speedup": 2.5}


def define_flags():
    flags.DEFINE_string("model", None, "Trained student (.keras).")
    flags.DEFINE_string("data_dir", None, "Dataset root with a validation split; default: the run's.")
    flags.DEFINE_string("dataset", None, "Layout of --data_dir; default: the run's, else mai2021.")
    flags.DEFINE_string("representative_data", None, "Calibration images; default: --data_dir.")
    flags.DEFINE_integer("num_calibration", 100, "Calibration images.", lower_bound=1)
    flags.DEFINE_integer("max_images", 64, "Validation pairs scored.", lower_bound=1)
    flags.DEFINE_string("latency_size", "480,640", "H,W the latency is measured at.")
    flags.DEFINE_integer("runs", 15, "Timed runs per variant.", lower_bound=1)
    flags.DEFINE_integer("num_threads", DEFAULT_NUM_THREADS, "LiteRT threads.", lower_bound=1)
    flags.DEFINE_string("output_dir", common.DEFAULT_OUTPUT_DIR, "Where int8_fidelity.md/.json go.")
    flags.DEFINE_bool("smoke", False, "Random 64x64 alpha-0.25 student on a few synthetic scenes.")


def _quantized(model, float_layers, calibration):
    """(tflite bytes, its Keras reference) for one variant; ``float_layers`` None: post-training."""
    from mdekd import export, quantization_aware
    from mdekd.tflite_runner import depth_only_model

    if float_layers is None:
        return export.convert(model, "int8", list(calibration)), None
    aware = quantization_aware.quantization_aware_model(model, float_layers)
    quantization_aware.calibrate(aware, calibration)
    return export.convert(aware, "int8"), aware


def benchmark_int8_fidelity(model_path, data_dir, dataset, representative_data=None, num_calibration=100,
                            max_images=64, latency_size=(480, 640), runs=15,
                            num_threads=DEFAULT_NUM_THREADS, output_dir=common.DEFAULT_OUTPUT_DIR, log=print):
    """Compare the int8 variants of ``model_path``; returns the int8_fidelity.json payload."""
    from mdekd import export
    from mdekd.data import list_pairs
    from mdekd.evaluate import evaluate_model
    from mdekd.models import deploy_model
    from mdekd.models.deploy import at_input_size
    from mdekd.predict import load_resized_images
    from mdekd.tflite_runner import KerasRunner, TFLiteRunner, load_keras_model

    model = load_keras_model(model_path)
    size = tuple(model.input_shape[1:3])
    calibration = load_resized_images(export.evenly_spaced(
        export.image_files(representative_data or data_dir, dataset), num_calibration), size)
    pairs = list_pairs(data_dir, "validation", dataset)[:max_images]
    images = load_resized_images([rgb for rgb, _ in pairs], size)
    float_network = deploy_model(model)
    float_depth = float_network.predict(images, verbose=0)
    score = lambda runner: evaluate_model(runner, data_dir, dataset, "validation",  # noqa: E731
                                          num_threads=num_threads, max_images=max_images)["metrics"]
    float_si_rmse = score(KerasRunner(float_network))["si_rmse"]

    full = at_input_size(model, latency_size)
    timed = {"fp32": TFLiteRunner(export.convert(full, "none"), num_threads=num_threads)}
    results = []
    for name, float_layers in VARIANTS.items():
        log(f"{name}: converting and scoring")
        tflite, aware = _quantized(model, float_layers, calibration)
        runner = TFLiteRunner(tflite, num_threads=num_threads)
        depth = runner.predict(images)
        own = float_depth if aware is None else aware.predict(images, verbose=0)["depth"]
        si_rmse = score(runner)["si_rmse"]
        results.append({
            "variant": name, "float_layers": None if float_layers is None else list(float_layers),
            "vs_float": export.relative_errors(float_depth, depth),
            "vs_own_keras": export.relative_errors(own, depth),
            "si_rmse": si_rmse, "si_rmse_change": (si_rmse - float_si_rmse) / float_si_rmse,
            "size_bytes": len(tflite), "ops": export.list_ops(tflite)})
        # the same variant at the latency size (the calibrated ranges carried over)
        noise = np.random.default_rng(0).random((2, *latency_size, 3), dtype=np.float32)  # PTQ: timing only
        large, large_aware = _quantized(full, float_layers, noise if float_layers is None else [])
        if large_aware is not None:
            large_aware.set_weights(aware.get_weights())
            large = export.convert(large_aware, "int8")
        timed[name] = TFLiteRunner(large, num_threads=num_threads)
    image = np.random.default_rng(0).random((1, *latency_size, 3), dtype=np.float32)
    timings = common.time_interleaved(timed, image, runs)
    medians = {key: float(np.median(seconds)) for key, seconds in timings.items()}
    for r in results:
        r["latency_ms"] = 1e3 * medians[r["variant"]]
        r["speedup_vs_fp32"] = medians["fp32"] / medians[r["variant"]]

    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    rows = [[r["variant"], common.fmt(100 * r["vs_float"]["mean_relative_diff"], 2),
             common.fmt(100 * r["vs_float"]["p99_relative_diff"], 2),
             common.fmt(100 * r["vs_own_keras"]["mean_relative_diff"], 2),
             common.fmt(100 * r["vs_own_keras"]["p99_relative_diff"], 2),
             common.fmt(r["si_rmse"], 4), common.fmt(100 * r["si_rmse_change"], 2),
             common.fmt(r["latency_ms"], 1), common.fmt(r["speedup_vs_fp32"], 2),
             yes(r["vs_float"]["mean_relative_diff"] <= TARGETS["mean"]
                 and r["vs_float"]["p99_relative_diff"] <= TARGETS["p99"])] for r in results]
    table = common.markdown_table(
        ["variant", "vs float mean %", "vs float p99 %", "vs own Keras mean %", "vs own Keras p99 %",
         "si-RMSE", "Δ si-RMSE %", f"ms {latency_size[0]}x{latency_size[1]}", "× fp32",
         "per-pixel targets met"], rows)
    notes = [f"Model {model_path} at {size[0]}x{size[1]}; {len(images)} validation pairs of {data_dir} "
             f"({dataset}); float Keras si-RMSE {float_si_rmse:.4f}; fp32 TFLite at {latency_size[0]}x"
             f"{latency_size[1]}: {1e3 * medians['fp32']:.1f} ms (median of {runs} interleaved runs, "
             f"{num_threads} threads); calibration {len(calibration)} images of "
             f"{representative_data or data_dir}. Targets: mean <= 1.5 %, p99 <= 6 % (vs float), "
             "Δ si-RMSE <= +0.5 %, int8 >= 2.5× fp32."]
    payload = {"model": os.path.abspath(model_path), "data_dir": os.fspath(data_dir), "dataset": dataset,
               "input_size": list(size), "latency_size": list(latency_size), "float_si_rmse": float_si_rmse,
               "fp32_latency_ms": 1e3 * medians["fp32"], "targets": TARGETS,
               "machine": common.machine_info(), "results": results}
    common.write_results(output_dir, "int8_fidelity", table, payload, notes)
    return payload


@command("benchmark.int8_fidelity")
def main(argv):
    import tempfile

    from benchmark.accuracy import smoke_inputs
    from mdekd import export, run_folder
    from mdekd.atomic import prepare_directory

    common.quiet_tensorflow()
    prepare_directory(FLAGS.output_dir, "--output_dir")
    if FLAGS.smoke:
        with tempfile.TemporaryDirectory(prefix="mdekd-int8-fidelity-") as temporary:
            model_path, data_dir = smoke_inputs(temporary)
            benchmark_int8_fidelity(model_path, data_dir, "synthetic", num_calibration=4, max_images=2,
                                    latency_size=(64, 64), runs=2, num_threads=FLAGS.num_threads,
                                    output_dir=FLAGS.output_dir)
        return
    if not FLAGS.model:
        raise ValueError("--model: a trained student (.keras) is required (or --smoke)")
    run = run_folder.read_run_config(FLAGS.model)
    data_dir = FLAGS.data_dir or run.get("data_dir")
    if data_dir is None:
        raise ValueError("--data_dir: a dataset root with a validation split is required")
    benchmark_int8_fidelity(FLAGS.model, data_dir, FLAGS.dataset or run.get("dataset") or "mai2021",
                            FLAGS.representative_data, FLAGS.num_calibration, FLAGS.max_images,
                            export.parse_input_size(FLAGS.latency_size), FLAGS.runs, FLAGS.num_threads,
                            FLAGS.output_dir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
