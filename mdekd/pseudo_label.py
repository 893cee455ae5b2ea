"""Label photos with any trained depth model: a teacher's pseudo-labels in the MAI2021 layout.

    python -m mdekd.pseudo_label --teacher runs/teacher/best.keras --input photos/ --output data/pseudo

Every image under ``--input`` (PNG/JPEG, searched recursively, any size) is run through the
teacher (``.keras``, or ``.tflite`` — so a model from another framework exported to TFLite can
teach) at the teacher's input size, and its depth is resized back to the image's own H×W. Written:
``OUT/train/rgb/<relative path>`` (the image file, copied byte for byte) and
``OUT/train/depth/<relative path without suffix>.png`` (uint16 millimetres, clipped to 65.535 m),
the layout ``train.py --dataset=mai2021 --data_dir=OUT`` reads. Each depth file is written
atomically and after its RGB copy, so the command resumes: images whose depth exists are skipped.
"""

import pathlib
import shutil
import sys

from absl import app, flags
from tqdm import tqdm

from mdekd.atomic import prepare_directory
from mdekd.cli import command
from mdekd.tflite_runner import DEFAULT_NUM_THREADS

FLAGS = flags.FLAGS


def pseudo_label(teacher, input_dir, output_dir, split="train", num_threads=DEFAULT_NUM_THREADS, progress=True):
    """Label every image of ``input_dir`` with ``teacher``; returns the number newly labelled."""
    from mdekd.atomic import atomic_path
    from mdekd.data import list_images, read_rgb
    from mdekd.predict import depth_to_uint16_mm, predict_depth, save_png
    from mdekd.tflite_runner import load_depth_runner

    input_dir, output_dir = pathlib.Path(input_dir), pathlib.Path(output_dir)
    check_output_dir(input_dir, output_dir)
    images = list_images(input_dir, flag="--input")
    runner = load_depth_runner(teacher, num_threads=num_threads)
    rgb_root, depth_root = output_dir / split / "rgb", output_dir / split / "depth"
    labelled = 0
    for source in tqdm(images, desc="pseudo-labels", unit="image", disable=not progress, file=sys.stderr):
        relative = pathlib.Path(source).relative_to(input_dir)
        depth_path = (depth_root / relative).with_suffix(".png")
        if not depth_path.exists():
            depth = predict_depth(runner, read_rgb(source))
            rgb_path = rgb_root / relative
            for folder in (rgb_path.parent, depth_path.parent):
                folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(rgb_path) as temporary:
                shutil.copyfile(source, temporary)
            save_png(depth_path, depth_to_uint16_mm(depth))
            labelled += 1
    return labelled


def check_output_dir(input_dir, output_dir):
    """Refuse an output inside the input (its files would become inputs) or one that cannot be made."""
    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input: folder not found: {input_dir}")
    inside = output_dir.resolve()
    if inside == input_dir.resolve() or input_dir.resolve() in inside.parents:
        raise ValueError(f"--output {output_dir} lies inside --input {input_dir}: its labels would be "
                         "read as photos on the next run; choose a folder outside the input")
    prepare_directory(output_dir, "--output")


@command("pseudo_label")
def main(argv):
    count = pseudo_label(FLAGS.teacher, FLAGS.input, FLAGS.output, num_threads=FLAGS.num_threads)
    print(f"labelled {count} new image(s) into {FLAGS.output}")


def _define_flags():
    flags.DEFINE_string("teacher", None, "Trained depth model: .keras or .tflite.", required=True)
    flags.DEFINE_string("input", None, "Folder of photos (recursive, any size).", required=True)
    flags.DEFINE_string("output", None, "Output root (MAI2021 layout, train split).", required=True)
    flags.DEFINE_integer("num_threads", DEFAULT_NUM_THREADS, "LiteRT threads for a .tflite teacher.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
