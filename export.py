"""Export a trained student to TFLite (fp32, fp16, dynamic-range or full int8), verified against Keras.

    python export.py --quantize fp16                 # newest runs/*/best.keras of a student
    python export.py --model runs/distill/best.keras --quantize int8 --representative_data data/mai2021

The .tflite file and its report (<output>.json) are written only after the converted model has
passed the checks of ``mdekd.export`` (builtin ops only, outputs within the mode's tolerance).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from mdekd import export, quantization, run_folder  # noqa: E402
from mdekd.cli import command  # noqa: E402
from mdekd.tflite_runner import DEFAULT_NUM_THREADS  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None,
                    "Trained network (.keras). Default: the newest runs/*/best.keras whose run.json "
                    "mode is student or distill.")
flags.DEFINE_enum("quantize", "none", quantization.NAMES,
                  "none: float32; fp16: float16 weights; dynamic: int8 weights (dynamic range); "
                  "int8: full integer, calibrated on --representative_data (float input/output).")
flags.DEFINE_string("representative_data", None,
                    "int8 calibration images: a dataset root with train/rgb (MAI2021 layout) or a "
                    "folder of images. Default: data_dir of the run.json beside the model.")
flags.DEFINE_string("dataset", None,
                    "Layout of the data folders (mai2021 | synthetic | folder | kitti | nyu). "
                    "Default: the run's, else mai2021.")
flags.DEFINE_float("depth_scale", None,
                   "Metres per stored depth unit of the validation truth (required for --dataset=folder, "
                   "as in mdekd.evaluate). Default: the run's.")
flags.DEFINE_integer("num_calibration", export.DEFAULT_NUM_CALIBRATION,
                     "Calibration images (spread evenly over the training images).", lower_bound=1)
flags.DEFINE_string("validation_data", None,
                    "Held-out data for the check against Keras: a dataset root with a validation "
                    "split (metrics too) or a folder of images. Default: the run's data_dir; "
                    "uniform noise images if there is none.")
flags.DEFINE_integer("num_verification", export.DEFAULT_NUM_VERIFICATION,
                     "Held-out images compared with Keras.", lower_bound=1)
flags.DEFINE_string("output", None,
                    "Output .tflite path. Default: <student|teacher>_<fp32|fp16|dynamic|int8>.tflite beside the model.")
flags.DEFINE_integer("num_threads", DEFAULT_NUM_THREADS, "LiteRT threads for the verification run.", lower_bound=1)
flags.DEFINE_string("input_size", None,
                    "H,W: run the network at this smaller size (multiples of 32) inside the model's own "
                    "input/output size; the image is resized down and the depth back up in the model.")
flags.DEFINE_string("runs_dir", "runs", "Where to look for the newest student when --model is not given.")


@command("export.py")
def main(argv):
    model = FLAGS.model
    if model is None:
        model = run_folder.find_latest_run(FLAGS.runs_dir)
        print(f"export.py: using the newest trained student {model}")
    report = export.export_tflite(
        model, FLAGS.quantize, output=FLAGS.output,
        representative_data=FLAGS.representative_data, dataset=FLAGS.dataset,
        depth_scale=FLAGS.depth_scale,
        num_calibration=FLAGS.num_calibration, validation_data=FLAGS.validation_data,
        num_verification=FLAGS.num_verification, num_threads=FLAGS.num_threads,
        input_size=FLAGS.input_size and export.parse_input_size(FLAGS.input_size),
    )
    print(export.summarize(report))


if __name__ == "__main__":
    app.run(main)
