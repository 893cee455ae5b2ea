"""Latency vs accuracy of reduced-resolution exports (``export.py --input_size``).

For each network input size, the trained student is exported (fp32 and int8) as
``mdekd.models.deploy.reduced_resolution_model`` at the camera size ``--height x --width``: the image
is resized down to the network size and the depth back up inside the TFLite model. Each export is
timed (LiteRT, ``--threads``, median of ``--runs`` after warm-up, the sizes interleaved) and scored
with ``mdekd.evaluate.evaluate_model`` on the validation split (each truth at its own size).

    python -m benchmark.resolution --model runs/quickstart_student/best.keras \\
        --data_dir data/resolution --sizes 480x640,384x512,256x320,192x256,128x160

A model trained at another size is first rebuilt at the camera size (it is fully convolutional).
Without ``--data_dir`` data, ``--data_dir`` is rendered (synthetic scenes at the camera size).
"""

import os

import numpy as np
from absl import app, flags

from benchmark import common
from mdekd.cli import command

FLAGS = flags.FLAGS
MODES = ("none", "int8")


def define_flags():
    flags.DEFINE_string("model", None, "Trained student (.keras).", required=True)
    flags.DEFINE_string("data_dir", "data/resolution", "Validation data at the camera size (rendered "
                        "as synthetic scenes if absent).")
    flags.DEFINE_string("dataset", "synthetic", "Layout of --data_dir.")
    flags.DEFINE_integer("height", 480, "Camera (model input/output) height.")
    flags.DEFINE_integer("width", 640, "Camera (model input/output) width.")
    flags.DEFINE_string("sizes", "480x640,384x512,256x320",
                        "Network input sizes HxW (multiples of 32: 240x320 is not one).")
    flags.DEFINE_string("representative_data", None, "int8 calibration images; default --data_dir.")
    flags.DEFINE_integer("num_calibration", 100, "int8 calibration images.", lower_bound=1)
    flags.DEFINE_integer("threads", 2, "LiteRT threads.", lower_bound=1)
    flags.DEFINE_integer("runs", 20, "Timed runs per export.", lower_bound=1)
    flags.DEFINE_integer("max_images", None, "Evaluate the first N validation pairs only.", lower_bound=1)
    flags.DEFINE_string("output_dir", common.DEFAULT_OUTPUT_DIR, "Where resolution.md/.json go.")


def parse_sizes(text):
    """'480x640,240x320' -> [(480, 640), (240, 320)]; ValueError naming --sizes otherwise."""
    try:
        return [tuple(int(n) for n in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"--sizes: expected HxW[,HxW...], got {text!r}") from None


def benchmark_resolution(model_path, data_dir, dataset, camera_size, sizes, threads=2, runs=20,
                         representative_data=None, num_calibration=100, max_images=None,
                         output_dir=common.DEFAULT_OUTPUT_DIR, log=print):
    """Export, time and score the student at each network size; returns the resolution.json payload."""
    from mdekd import export
    from mdekd.evaluate import evaluate_model
    from mdekd.models.deploy import at_input_size, reduced_resolution_model
    from mdekd.tflite_runner import TFLiteRunner, load_keras_model

    model = load_keras_model(model_path)
    if tuple(model.input_shape[1:3]) != tuple(camera_size):
        model = at_input_size(model, camera_size)
    paths = export.evenly_spaced(export.image_files(representative_data or data_dir, dataset), num_calibration)
    calibration = export.CalibrationImages(paths, camera_size, progress=False)
    runners = {}
    for size in sizes:
        network = reduced_resolution_model(model, size)
        for mode in MODES:
            log(f"exporting {size[0]}x{size[1]} {mode}")
            runners[(size, mode)] = TFLiteRunner(
                export.convert(network, mode, calibration if mode == "int8" else None), num_threads=threads)
    image = np.random.default_rng(0).random((1, *camera_size, 3), dtype=np.float32)
    timings = common.time_interleaved(runners, image, runs)
    results = []
    for (size, mode), runner in runners.items():
        log(f"evaluating {size[0]}x{size[1]} {mode}")
        metrics = evaluate_model(runner, data_dir, dataset, max_images=max_images)["metrics"]
        results.append({"network_size": list(size), "mode": mode, "size_bytes": len(runner.model_bytes),
                        **common.timing_stats(timings[(size, mode)]), "metrics": metrics})
    rows = [[f"{r['network_size'][0]}x{r['network_size'][1]}", "fp32" if r["mode"] == "none" else r["mode"],
             common.fmt(r["median_ms"], 1), common.fmt(r["p90_ms"], 1), common.fmt(r["metrics"]["si_rmse"], 4),
             common.fmt(r["metrics"]["abs_rel"], 4), common.fmt(r["metrics"]["delta1"], 4)] for r in results]
    table = common.markdown_table(["network input", "mode", "median ms", "p90 ms", "si_rmse", "abs_rel",
                                   "delta1"], rows)
    notes = [f"Student {model_path}, camera size {camera_size[0]}x{camera_size[1]} (input and output of every "
             f"export), {threads} LiteRT threads, median of {runs} interleaved runs; metrics on the validation "
             f"split of {data_dir} ({dataset}) at the truth's own size."]
    payload = {"model": os.path.abspath(model_path), "camera_size": list(camera_size), "data_dir": os.fspath(data_dir),
               "machine": common.machine_info(), "results": results}
    common.write_results(output_dir, "resolution", table, payload, notes)
    return payload


@command("benchmark.resolution")
def main(argv):
    from mdekd.atomic import prepare_directory
    from mdekd.data.synthetic import generate_dataset

    common.quiet_tensorflow()
    camera = (FLAGS.height, FLAGS.width)
    sizes = parse_sizes(FLAGS.sizes)
    prepare_directory(FLAGS.output_dir, "--output_dir")
    data_dir = FLAGS.data_dir
    if FLAGS.dataset == "synthetic" and not os.path.isdir(os.path.join(data_dir, "validation")):
        data_dir = generate_dataset(data_dir, train=100, validation=64, height=camera[0], width=camera[1],
                                    seed=1, progress=True)
    benchmark_resolution(FLAGS.model, data_dir, FLAGS.dataset, camera, sizes, threads=FLAGS.threads,
                         runs=FLAGS.runs, representative_data=FLAGS.representative_data,
                         num_calibration=FLAGS.num_calibration, max_images=FLAGS.max_images,
                         output_dir=FLAGS.output_dir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
