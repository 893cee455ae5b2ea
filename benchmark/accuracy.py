"""Accuracy of a trained student as Keras and as each TFLite variant, on a validation split.

    python -m benchmark.accuracy                                   # newest runs/*/best.keras student
    python -m benchmark.accuracy --model runs/distill/best.keras --data_dir data/mai2021
    python -m benchmark.accuracy --smoke                           # tiny random student, seconds

Metrics: si-RMSE (scale-invariant), and RMSE/rel raw and after per-image median scaling (the
networks are trained with scale-invariant losses only, so their absolute scale is arbitrary).
Each TFLite variant is converted in memory from the .keras model with ``mdekd.export.convert``
(int8 calibrated on ``--num_calibration`` training images), then every model goes through the
same ``mdekd.evaluate.evaluate_model`` (design.md §2 metrics, LiteRT with ``--num_threads``). The
relative change of si-RMSE against Keras is checked against the issue's targets on a trained
student: fp16 <= 0.1 %, int8 <= 2 %. An untrained (smoke) model says nothing about those.
"""

import os
import tempfile

from absl import app, flags

from benchmark import common
from mdekd.atomic import prepare_directory
from mdekd.cli import command
from mdekd.quantization import LABELS, mode_of_label
from mdekd.tflite_runner import DEFAULT_NUM_THREADS

FLAGS = flags.FLAGS

VARIANTS = ("keras", *LABELS)  # keras + the TFLite modes of mdekd.quantization, by label
# Largest relative si-RMSE increase over Keras, from the issue (trained student, 480×640).
SI_RMSE_TARGETS = {"fp16": 0.001, "int8": 0.02}


def define_flags():
    """Command-line flags (defined only when run as a program, so modules import side-effect free)."""
    flags.DEFINE_string("model", None, "Trained student (.keras); default: newest runs/*/best.keras of a student run.")
    flags.DEFINE_string("data_dir", None, "Dataset root with the validation split; default: the run's data_dir.")
    flags.DEFINE_string("dataset", None, "Layout of --data_dir; default: the run's, else mai2021.")
    flags.DEFINE_string("split", "validation", "Split evaluated.")
    flags.DEFINE_list("variants", list(VARIANTS), "keras and TFLite fp32, fp16, dynamic, int8.")
    flags.DEFINE_string("representative_data", None, "int8 calibration images; default: --data_dir (its train/rgb).")
    flags.DEFINE_integer("num_calibration", 100, "int8 calibration images.", lower_bound=1)
    flags.DEFINE_integer("num_threads", DEFAULT_NUM_THREADS, "LiteRT threads.", lower_bound=1)
    flags.DEFINE_integer("max_images", None, "Evaluate the first N pairs only.", lower_bound=1)
    flags.DEFINE_string("runs_dir", "runs", "Where to look for the newest student.")
    flags.DEFINE_string("output_dir", common.DEFAULT_OUTPUT_DIR, "Where accuracy.md/.json go.")
    flags.DEFINE_bool("smoke", False, "Random 64x64 alpha-0.25 student on a few synthetic scenes; keras, fp32, int8.")


def benchmark_accuracy(model_path, data_dir, dataset, split="validation", variants=VARIANTS,
                       representative_data=None, num_calibration=100, num_threads=DEFAULT_NUM_THREADS, max_images=None,
                       output_dir=common.DEFAULT_OUTPUT_DIR, log=print):
    """Evaluate ``model_path`` as Keras and as each TFLite variant; returns the accuracy.json payload."""
    from mdekd import export
    from mdekd.evaluate import evaluate_model
    from mdekd.tflite_runner import KerasRunner, TFLiteRunner, depth_only_model, load_keras_model

    machine = common.machine_info()
    trained = load_keras_model(model_path)
    network = depth_only_model(trained)
    input_size = tuple(network.input_shape[1:3])
    from mdekd.data import list_pairs
    from mdekd.predict import load_resized_images

    pairs = list_pairs(data_dir, split, dataset)[:max_images]
    images = load_resized_images([rgb for rgb, _ in pairs], input_size)
    keras_runner = KerasRunner(network)
    keras_depth = keras_runner.predict(images)
    results = []
    for variant in variants:
        if variant == "keras":
            model, size = keras_runner, os.path.getsize(model_path)
        else:
            calibration = None
            if mode_of_label(variant).integer_only:
                paths = export.evenly_spaced(export.image_files(representative_data or data_dir, dataset),
                                             num_calibration)
                calibration = export.CalibrationImages(paths, input_size)
            tflite = export.convert(trained, mode_of_label(variant).name, calibration)
            model, size = TFLiteRunner(tflite, num_threads=num_threads), len(tflite)
        log(f"evaluating {variant}")
        evaluation = evaluate_model(model, data_dir, dataset, split, num_threads=num_threads,
                                    max_images=max_images, median_scaling=True)
        pixels = export.relative_errors(keras_depth, model.predict(images))  # vs Keras, model size
        results.append({"variant": variant, "size_bytes": size, **evaluation,
                        "pixel_mean_relative_diff": pixels["mean_relative_diff"],
                        "pixel_p99_relative_diff": pixels["p99_relative_diff"],
                        "model": os.path.abspath(model_path)})
    reference = next((r for r in results if r["variant"] == "keras"), None)
    for r in results:
        if reference is not None:
            keras_si = reference["metrics"]["si_rmse"]
            r["si_rmse_change"] = (r["metrics"]["si_rmse"] - keras_si) / keras_si
        target = SI_RMSE_TARGETS.get(r["variant"])
        r["si_rmse_target"] = target
        r["target_met"] = None if target is None or reference is None else r["si_rmse_change"] <= target

    rows = [[r["variant"], common.fmt(r["size_bytes"] / 1e6, 2), common.fmt(r["metrics"]["si_rmse"], 4),
             common.fmt(r["metrics"]["rmse"], 4), common.fmt(r["metrics"]["abs_rel"], 4),
             common.fmt(r["median_scaled_metrics"]["rmse"], 4), common.fmt(r["median_scaled_metrics"]["abs_rel"], 4),
             common.fmt(r["median_scaled_metrics"]["delta1"], 4),
             common.fmt(100 * r["si_rmse_change"], 3) if "si_rmse_change" in r else "",
             common.fmt(100 * r["pixel_mean_relative_diff"], 2), common.fmt(100 * r["pixel_p99_relative_diff"], 2),
             "" if r["si_rmse_target"] is None else f"<= {100 * r['si_rmse_target']:g} %",
             {None: "", True: "yes", False: "NO"}[r["target_met"]]] for r in results]
    table = common.markdown_table(
        ["variant", "size MB", "si_rmse", "rmse", "abs_rel", "rmse (med.)", "abs_rel (med.)", "delta1 (med.)",
         "Δ si-RMSE %", "Δ px mean %", "Δ px p99 %", "target", "met"], rows)
    first = results[0] if results else {}
    notes = [f"Model {model_path} at {input_size[0]}x{input_size[1]}; {first.get('num_images')} images of the "
             f"{split} split of {data_dir} ({dataset}); prediction resized to the truth (mdekd.evaluate); "
             f"(med.): after scaling each prediction by median(truth)/median(prediction), since the "
             f"training losses are scale-invariant; "
             f"int8 calibrated on {num_calibration} training images; LiteRT {num_threads} threads."]
    payload = {"model": os.path.abspath(model_path), "data_dir": os.fspath(data_dir), "dataset": dataset,
               "split": split, "input_size": list(input_size), "machine": machine, "results": results}
    common.write_results(output_dir, "accuracy", table, payload, notes)
    return payload


def smoke_inputs(directory):
    """A random 64x64 alpha-0.25 student (.keras) and 4 + 3 synthetic scenes, in ``directory``."""
    import keras

    from mdekd.data.synthetic import generate_dataset
    from mdekd.models import build_student

    keras.utils.set_random_seed(0)
    model_path = os.path.join(directory, "student.keras")
    build_student((64, 64, 3), alpha=0.25).save(model_path)
    data_dir = generate_dataset(os.path.join(directory, "synthetic"), train=4, validation=3, height=64,
                                width=64, seed=0, workers=1, progress=False)
    return model_path, os.fspath(data_dir)


@command("benchmark.accuracy")
def main(argv):
    common.quiet_tensorflow()
    from mdekd import run_folder

    prepare_directory(FLAGS.output_dir, "--output_dir")
    unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="mdekd-accuracy-") as temporary:
        if FLAGS.smoke:
            model, data_dir = smoke_inputs(temporary)
            dataset, variants, calibration = "synthetic", ["keras", "fp32", "int8"], 4
            if FLAGS["variants"].present:
                variants = FLAGS.variants
        else:
            model = FLAGS.model or run_folder.find_latest_run(FLAGS.runs_dir)
            if not FLAGS.model:
                print(f"benchmark.accuracy: using the newest trained student {model}")
            run = run_folder.read_run_config(model) if os.path.isfile(model) else {}
            data_dir = FLAGS.data_dir or run.get("data_dir")
            if data_dir is None:
                raise ValueError("--data_dir is required (no run.json data_dir beside the model)")
            dataset = FLAGS.dataset or run.get("dataset") or "mai2021"
            variants, calibration = FLAGS.variants, FLAGS.num_calibration
        benchmark_accuracy(model, data_dir, dataset, FLAGS.split, variants,
                           representative_data=FLAGS.representative_data, num_calibration=calibration,
                           num_threads=FLAGS.num_threads, max_images=FLAGS.max_images,
                           output_dir=FLAGS.output_dir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
