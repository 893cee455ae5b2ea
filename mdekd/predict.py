"""Depth of single images of any size with a trained model (.keras or .tflite).

The image is resized (bilinear, antialiased as in training) to the model's fixed input size, and
the predicted depth is resized back (bilinear) to the image's own size, so the output map has the
input's H×W (the same rule as ``mdekd.evaluate``). Written per image
``<stem>``: ``<stem>_depth.png`` (uint16, millimetres, clipped to 65535, 0 = none),
``<stem>_color.png`` (Turbo colour map, near = red) and, when a truth folder is given,
``<stem>_panel.png`` = RGB | truth | prediction | |error| side by side.

    python -m mdekd.predict --model runs/student/best.keras --input photo.jpg --output out/
"""

import os

import numpy as np

from mdekd.cli import command
from mdekd.constants import valid_depth
from mdekd.tflite_runner import DEFAULT_NUM_THREADS

MILLIMETRES_PER_METRE = 1000.0  # design.md §3: MAI2021 depth PNGs are uint16 millimetres
UINT16_MAX = 65535


def resize_image(image, size):
    """(H, W, 3) float32 -> (size[0], size[1], 3) float32, bilinear with antialiasing.

    The same resize as the training pipeline (``mdekd.data.build_dataset``), so a model sees
    images prepared as in training. No copy if the image already has that size.
    """
    import tensorflow as tf

    image = np.asarray(image, dtype=np.float32)
    if tuple(image.shape[:2]) == tuple(size):
        return image
    resized = tf.image.resize(image, size, method="bilinear", antialias=True).numpy()
    return np.clip(resized, 0.0, 1.0)  # antialiased resampling may overshoot slightly


def load_resized_images(paths, size):
    """(N, size[0], size[1], 3) float32 in [0, 1]: the image files ``paths``, each ``resize_image``d."""
    from mdekd.data import read_rgb

    return np.stack([resize_image(read_rgb(path), size) for path in paths])


def resize_depth(depth, size):
    """Predicted depth (H, W) or (H, W, 1) metres -> (size[0], size[1]) float32, bilinear.

    Only for predictions (all pixels valid): ground truth is never interpolated, since blending a
    0 (invalid) pixel with its neighbours would invent depths.
    """
    import tensorflow as tf

    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim == 2:
        depth = depth[..., None]
    if tuple(depth.shape[:2]) != tuple(size):
        depth = tf.image.resize(depth, size, method="bilinear").numpy()
    return depth[..., 0]


def predict_depth(model_or_runner, image):
    """Depth (H, W) float32 metres of one RGB image (H, W, 3) float32 in [0, 1] of any size.

    ``model_or_runner``: a ``keras.Model``, a runner of ``mdekd.tflite_runner``, or a model path.
    """
    from mdekd.tflite_runner import load_depth_runner

    runner = load_depth_runner(model_or_runner)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), found shape {image.shape}")
    depth = runner.predict(resize_image(image, runner.input_size)[None])[0]
    return resize_depth(depth, image.shape[:2])


def depth_to_uint16_mm(depth):
    """(H, W) metres -> (H, W) uint16 millimetres, rounded, clipped to [0, 65535]; NaN -> 0."""
    millimetres = np.nan_to_num(np.asarray(depth, dtype=np.float64) * MILLIMETRES_PER_METRE)
    return np.clip(np.round(millimetres), 0, UINT16_MAX).astype(np.uint16)


def depth_panel(image, depth_true, depth_pred):
    """RGB | truth | prediction | absolute error, side by side: (H, 4W, 3) uint8.

    image (H, W, 3) [0, 1]; depth_true, depth_pred (H, W) metres, truth 0 = invalid. Truth and
    prediction share one colour range (that of the valid truth); the error map spans 0 to its
    98th percentile; pixels without truth are black in both the truth and the error panels.
    """
    from mdekd.colormap import colorize_depth, depth_range, turbo

    depth_true = np.asarray(depth_true, dtype=np.float32)
    depth_pred = np.asarray(depth_pred, dtype=np.float32)
    if depth_true.shape != depth_pred.shape or depth_true.shape != image.shape[:2]:
        raise ValueError(
            f"image {image.shape[:2]}, truth {depth_true.shape} and prediction {depth_pred.shape} "
            f"must have the same H×W"
        )
    valid = valid_depth(depth_true)
    low, high = depth_range(depth_true if valid.any() else depth_pred)
    error = np.where(valid, np.abs(depth_pred - depth_true), 0.0)
    error_high = float(np.percentile(error[valid], 98.0)) if valid.any() else 1.0
    error_rgb = turbo(error / max(error_high, 1e-6))
    error_rgb[~valid] = 0
    rgb = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.concatenate(
        [rgb, colorize_depth(depth_true, low, high), colorize_depth(depth_pred, low, high), error_rgb],
        axis=1,
    )


def save_png(path, array):
    """Write a uint8 RGB or uint16 single-channel array as PNG, atomically (temp file + rename)."""
    from PIL import Image

    from mdekd.atomic import atomic_path

    with atomic_path(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")


def predict_files(model, inputs, output_dir, depth_dir=None, dataset="mai2021", depth_scale=None,
                  num_threads=DEFAULT_NUM_THREADS, log=print):
    """Predict every image of ``inputs`` (a file, or the images directly in a folder) and write the
    PNGs into ``output_dir``.

    Returns a list of dicts (input, size, written files). A truth file in ``depth_dir`` pairs with
    an image by ``dataset``'s layout rule (``mdekd.data.depth_file_for``; MAI2021: the same stem,
    PNG); ``depth_scale``: metres per stored unit, default the layout's (1e-3 for millimetres).
    """
    from mdekd.colormap import colorize_depth
    from mdekd.data import depth_file_for, list_images, read_depth_png, read_rgb, resolve_layout
    from mdekd.atomic import prepare_directory
    from mdekd.tflite_runner import load_depth_runner

    paths = list_images(inputs, flag="--input", recursive=False)
    layout = resolve_layout(dataset, **({} if depth_scale is None else {"depth_scale": depth_scale}))
    if depth_dir is not None:
        if not os.path.isdir(depth_dir):
            raise FileNotFoundError(f"--depth_dir: no such folder: {depth_dir}")
        if layout.depth_scale is None:
            raise ValueError(f"--depth_scale: dataset {dataset!r} needs the metres per stored depth unit")
    prepare_directory(output_dir, "--output")
    runner = load_depth_runner(model, num_threads=num_threads)
    results = []
    for path in paths:
        image = read_rgb(path)
        depth = predict_depth(runner, image)
        stem = os.path.splitext(os.path.basename(path))[0]
        written = {
            "depth": os.path.join(output_dir, f"{stem}_depth.png"),
            "color": os.path.join(output_dir, f"{stem}_color.png"),
        }
        save_png(written["depth"], depth_to_uint16_mm(depth))
        save_png(written["color"], colorize_depth(depth))
        if depth_dir is not None:
            truth_path = depth_file_for(path, depth_dir, dataset)
            truth = read_depth_png(truth_path, layout.depth_scale)[..., 0]
            if truth.shape != depth.shape:
                raise ValueError(f"RGB {path} is {depth.shape[1]}x{depth.shape[0]} but its depth "
                                 f"{truth_path} is {truth.shape[1]}x{truth.shape[0]}; a pair must share one size")
            written["panel"] = os.path.join(output_dir, f"{stem}_panel.png")
            save_png(written["panel"], depth_panel(image, truth, depth))
        log(f"{path}: {image.shape[1]}x{image.shape[0]}, depth {depth.min():.2f}-{depth.max():.2f} m "
            f"-> {', '.join(written.values())}")
        results.append({"input": path, "size": list(image.shape[:2]), "files": written})
    return results


@command("mdekd.predict")
def main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    predict_files(FLAGS.model, FLAGS.input, FLAGS.output, depth_dir=FLAGS.depth_dir,
                  dataset=FLAGS.dataset, depth_scale=FLAGS.depth_scale, num_threads=FLAGS.num_threads)


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model", None, "Trained model: .keras or .tflite.", required=True)
    flags.DEFINE_string("input", None, "An image file or a folder of images.", required=True)
    flags.DEFINE_string("output", None, "Folder for the output PNGs (created).", required=True)
    flags.DEFINE_string("depth_dir", None,
                        "Optional folder of ground-truth depth PNGs paired with the images by "
                        "--dataset's naming rule; adds an RGB | truth | prediction | error panel.")
    flags.DEFINE_string("dataset", "mai2021", "Layout whose naming rule and depth scale the truth follows "
                        "(mai2021 | synthetic | kitti | nyu | folder).")
    flags.DEFINE_float("depth_scale", None,
                       "Metres per stored unit of the truth PNGs; default the --dataset's "
                       "(mai2021 1e-3, kitti 1/256; required for folder).")
    flags.DEFINE_integer("num_threads", DEFAULT_NUM_THREADS, "LiteRT threads for a .tflite model.", lower_bound=1)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    _define_flags()
    app.run(main)
