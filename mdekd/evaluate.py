"""design.md §2 metrics of a trained model (.keras or .tflite) over one split of a dataset.

Resolution rule (the same for Keras and TFLite, and the same as ``mdekd.predict``): each image
is resized (bilinear) to the model's fixed input size, and the predicted depth is resized
(bilinear) back to the size of its ground truth; the metrics are computed there, on the truth's
own valid pixels. The truth is never interpolated, since blending an invalid 0 into its
neighbours would invent depths. For MAI2021 at 480×640 no resizing happens at all.

    python -m mdekd.evaluate --model runs/distill/best.keras --data_dir data/mai2021 --json out.json
"""

import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from mdekd.atomic import prepare_file
from mdekd.cli import command
from mdekd.constants import valid_depth
from mdekd.tflite_runner import DEFAULT_NUM_THREADS, load_depth_runner

DEFAULT_BATCH_SIZE = 4


def median_scaled(depth_true, depth_pred):
    """``depth_pred`` × median(truth) / median(prediction) over the valid truth pixels.

    The usual protocol for networks trained only with scale-invariant losses (SI, gradient
    matching), whose absolute scale is arbitrary; si-RMSE is unchanged by it.
    """
    valid = valid_depth(depth_true)
    if not valid.any():
        return depth_pred
    return depth_pred * (np.median(depth_true[valid]) / max(float(np.median(depth_pred[valid])), 1e-12))


def evaluate_model(model, data_dir, dataset="mai2021", split="validation", batch_size=DEFAULT_BATCH_SIZE,
                   num_threads=DEFAULT_NUM_THREADS, max_images=None, progress=False, median_scaling=False,
                   **layout_options):
    """design.md §2 metrics of ``model`` over the ``split`` pairs of ``data_dir``.

    model: a ``keras.Model``, a runner of ``mdekd.tflite_runner`` or a .keras/.tflite path.
    dataset / layout_options: as ``mdekd.data.list_pairs`` (``depth_scale=`` for ``folder``).
    Keras models run ``batch_size`` images per call; TFLite ones one image at a time with
    ``num_threads`` LiteRT threads. ``max_images``: the first N pairs only.

    Returns a dict: ``metrics`` (name -> float, ``mdekd.metrics.METRIC_NAMES``), ``num_images``
    (pairs read), ``num_valid_images`` (those with a valid truth pixel, averaged over), ``model``,
    ``format`` ("keras" | "tflite"), ``input_size`` [H, W], ``data_dir``, ``dataset``, ``split``,
    ``seconds``; with ``median_scaling`` also ``median_scaled_metrics`` (``median_scaled``).
    """
    from mdekd.data import list_pairs, read_depth_png, read_rgb, resolve_layout
    from mdekd.metrics import DepthMetricsAccumulator
    from mdekd.predict import resize_depth, resize_image

    depth_scale = resolve_layout(dataset, **layout_options).depth_scale
    if depth_scale is None:
        raise ValueError(f"dataset {dataset!r} needs depth_scale= (metres per stored depth unit)")
    pairs = list_pairs(data_dir, split, dataset, **layout_options)
    if max_images is not None:
        pairs = pairs[: int(max_images)]
    runner = load_depth_runner(model, num_threads=num_threads)
    accumulator = DepthMetricsAccumulator()
    scaled_accumulator = DepthMetricsAccumulator() if median_scaling else None
    start = time.perf_counter()
    for first in tqdm(range(0, len(pairs), batch_size), desc="evaluating", unit="batch",
                      disable=not progress, file=sys.stderr):
        batch = pairs[first : first + batch_size]
        originals = [read_rgb(rgb) for rgb, _ in batch]
        images = np.stack([resize_image(image, runner.input_size) for image in originals])
        predictions = runner.predict(images)
        for (rgb_path, depth_path), original, prediction in zip(batch, originals, predictions):
            truth = read_depth_png(depth_path, depth_scale)
            if truth.shape[:2] != original.shape[:2]:
                raise ValueError(f"RGB {rgb_path} is {original.shape[1]}x{original.shape[0]} but its "
                                 f"depth {depth_path} is {truth.shape[1]}x{truth.shape[0]}; a pair must "
                                 "share one size")
            prediction = resize_depth(prediction, truth.shape[:2])[..., None]
            accumulator.update(truth, prediction)
            if scaled_accumulator is not None:
                scaled_accumulator.update(truth, median_scaled(truth, prediction))
    result = {
        "metrics": accumulator.result(),
        "num_images": len(pairs),
        "num_valid_images": accumulator.num_images,
        "model": runner.source,
        "format": runner.format,
        "input_size": list(runner.input_size),
        "data_dir": os.fspath(data_dir),
        "dataset": dataset,
        "split": split,
        "seconds": time.perf_counter() - start,
    }
    if scaled_accumulator is not None:
        result["median_scaled_metrics"] = scaled_accumulator.result()
    return result


def format_result(result, name=None):
    """Markdown table of one evaluation result (one row, two with median scaling)."""
    from mdekd.metrics import format_metrics_table

    row = name or os.path.basename(str(result["model"]))
    rows = {row: result["metrics"]}
    if "median_scaled_metrics" in result:
        rows[f"{row}, median-scaled"] = result["median_scaled_metrics"]
    return format_metrics_table(rows, name_header="model")


def write_json(path, payload):
    """Write JSON atomically (temp file + rename)."""
    from mdekd.export import write_atomically

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    write_atomically(path, json.dumps(payload, indent=2) + "\n")


@command("mdekd.evaluate")
def main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    layout_options = {} if FLAGS.depth_scale is None else {"depth_scale": FLAGS.depth_scale}
    if FLAGS.json:
        prepare_file(FLAGS.json, "--json")  # before minutes of evaluation, not after
    result = evaluate_model(FLAGS.model, FLAGS.data_dir, FLAGS.dataset, FLAGS.split,
                            batch_size=FLAGS.batch_size, num_threads=FLAGS.num_threads,
                            max_images=FLAGS.max_images, progress=True,
                            median_scaling=FLAGS.median_scaling, **layout_options)
    print(format_result(result))
    print(f"{result['num_valid_images']} of {result['num_images']} images with valid depth, "
          f"{FLAGS.split} split of {FLAGS.data_dir} ({FLAGS.dataset}), {result['format']} "
          f"model at {result['input_size'][0]}x{result['input_size'][1]}, {result['seconds']:.1f} s")
    if FLAGS.json:
        write_json(FLAGS.json, result)
        print(f"wrote {FLAGS.json}")


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model", None, "Trained model: .keras or .tflite.", required=True)
    flags.DEFINE_string("data_dir", None, "Dataset root.", required=True)
    flags.DEFINE_string("dataset", "mai2021", "Layout: mai2021 | synthetic | folder | kitti | nyu.")
    flags.DEFINE_string("split", "validation", "Split folder under the root.")
    flags.DEFINE_float("depth_scale", None, "Metres per stored depth unit (required for --dataset=folder).")
    flags.DEFINE_string("json", None, "Also write the result as JSON here.")
    flags.DEFINE_integer("num_threads", DEFAULT_NUM_THREADS, "LiteRT threads for a .tflite model.", lower_bound=1)
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Images per Keras call.", lower_bound=1)
    flags.DEFINE_integer("max_images", None, "Evaluate the first N pairs only.", lower_bound=1)
    flags.DEFINE_bool("median_scaling", False,
                      "Also report the metrics after scaling each prediction by median(truth)/median(pred) "
                      "(for models trained with scale-invariant losses only).")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    _define_flags()
    app.run(main)
