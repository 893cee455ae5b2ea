"""TFLite export of a trained depth model: conversion, verification against Keras, atomic write.

design.md §5. The depth-only inference graph (``mdekd.models.inference_model``) is converted at the
model's fixed input size with ``tf.lite.TFLiteConverter.from_keras_model`` (toolchain.md §2: the
route that keeps the weights; ``from_concrete_functions`` with a ``trackable_obj`` writes a model
without weights that outputs NaN). Modes:

=========  =============================================================================
``none``   float32 (labelled ``fp32``)
``fp16``   float16 weights (dequantised to float32 on a CPU, toolchain.md §8)
``dynamic`` int8 weights, float activations (dynamic-range quantisation)
``int8``   full integer, activations calibrated on training images; float input/output kept
=========  =============================================================================

Every conversion is then loaded with LiteRT (XNNPACK, explicit thread count), refused if it holds
a CUSTOM or Flex op (toolchain.md §3: the pip runtime cannot run them), run on held-out images and
compared with the Keras model. Only a model within its mode's ``TOLERANCES`` is written, atomically
(``mdekd.atomic``), with a JSON report beside it (``<output>.json``).
"""

import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import sys

import numpy as np
from tqdm import tqdm

from mdekd.atomic import write_bytes_atomically
from mdekd.predict import IMAGE_SUFFIXES
from mdekd.tflite_runner import DEFAULT_NUM_THREADS, TFLiteRunner, depth_only_model, load_keras_model

MODES = ("none", "fp16", "dynamic", "int8")
MODE_LABELS = {"none": "fp32", "fp16": "fp16", "dynamic": "dynamic", "int8": "int8"}
DEFAULT_NUM_CALIBRATION = 100  # toolchain.md §9: calibrate int8 on >= 100 real training images
DEFAULT_NUM_VERIFICATION = 16
STUDENT_RUN_MODES = ("student", "distill")  # run.json "mode" of runs whose network is a student


class ExportError(ValueError):
    """A conversion that must not be written: forbidden ops, or outputs outside the tolerance."""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Largest accepted TFLite-vs-Keras disagreement of one mode (depth in metres, > 0).

    Errors are per pixel and relative, r = |d_tflite − d_keras| / d_keras (depth is > 0 by
    construction), so they do not depend on the scene's scale: ``mean_relative`` bounds the mean
    of r, ``p99_relative`` its 99th percentile, ``max_relative`` its maximum (None: not gated).
    With ground truth, the design.md §2 metrics of both models are compared too: ``metric_drift``
    bounds |m_tflite − m_keras| / m_keras for si_rmse and abs_rel, and ``delta1_drop`` bounds how
    much δ<1.25 may fall (absolute fraction of pixels).
    """

    mean_relative: float
    p99_relative: float
    max_relative: float | None
    metric_drift: float
    delta1_drop: float


# Why these numbers (measured at 128×160 on a student trained 96 steps on synthetic scenes, and
# on random students). fp32 differs from Keras by summation order only: ~1e-7 relative on a
# trained or freshly initialised student, 2.5e-5 mean / 3.7e-4 max on a random one whose
# BatchNorm statistics were set from images (random weights with normalised activations amplify
# rounding layer by layer); the gates leave >= 4× margin and are 1000× below a wrong weight or op.
# fp16 weights carry 2^-11 ≈ 5e-4 relative rounding each: 0.2 % mean error measured; gate 1 %.
# Dynamic-range and int8 add quantisation noise: int8 measured 4.6 % mean, 20 % at p99 and 64 %
# at worst (a far pixel beyond the calibrated output range; the int8 output has 256 levels),
# with si-RMSE unchanged (-0.05 %): so int8/dynamic gate the mean (15 %) and p99 (50 %), not the
# maximum. A broken conversion (saturated activation ranges, inputs in 0-255 instead of [0, 1],
# a mis-scaled head) errs by tens of per cent to 100 % on most pixels. These are sanity gates that
# must also pass on untrained networks and a few images: the accuracy targets (int8 <= 2 %,
# fp16 <= 0.1 % relative si-RMSE on a trained student) are measured by ``benchmark.accuracy``.
TOLERANCES = {
    "none": Tolerance(mean_relative=1e-4, p99_relative=1e-3, max_relative=1e-2,
                      metric_drift=1e-3, delta1_drop=1e-3),
    "fp16": Tolerance(mean_relative=1e-2, p99_relative=5e-2, max_relative=0.25,
                      metric_drift=1e-2, delta1_drop=1e-2),
    "dynamic": Tolerance(mean_relative=0.15, p99_relative=0.5, max_relative=None,
                         metric_drift=0.10, delta1_drop=0.05),
    "int8": Tolerance(mean_relative=0.15, p99_relative=0.5, max_relative=None,
                      metric_drift=0.10, delta1_drop=0.05),
}


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"quantize mode must be one of {', '.join(MODES)}, got {mode!r}")


# ---------------------------------------------------------------------------------------------
# Image sources: calibration (training images) and verification (held-out images, maybe with truth)


def image_files(directory, dataset=None):
    """RGB images for calibration: ``<dir>/train/rgb`` (MAI2021 layout), ``<dir>/rgb``, or the
    image files directly in ``<dir>`` — the first of these that holds any; failing those, the RGB
    files of the ``train`` pairs of ``dataset`` (nested layouts such as KITTI). Sorted paths.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--representative_data: no such folder: {directory}")
    candidates = [os.path.join(directory, "train", "rgb"), os.path.join(directory, "rgb"), directory]
    for folder in candidates:
        if os.path.isdir(folder):
            names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
            if names:
                return [os.path.join(folder, n) for n in names]
    if dataset is not None and os.path.isdir(os.path.join(directory, "train")):
        from mdekd.data import list_pairs

        return [rgb for rgb, _ in list_pairs(directory, "train", dataset)]
    raise ValueError(
        f"--representative_data: no images ({', '.join(IMAGE_SUFFIXES)}) in "
        f"{' or '.join(c for c in candidates)}"
    )


def check_images(paths):
    """Raise ValueError naming the first file whose header is not that of an image PIL reads."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{path}: not a readable image ({error})") from error


def evenly_spaced(items, count):
    """``count`` items spread evenly over ``items`` (all of them if there are fewer)."""
    items = list(items)
    if count is None or count >= len(items):
        return items
    indices = np.linspace(0, len(items) - 1, num=max(int(count), 1)).round().astype(int)
    return [items[i] for i in sorted(set(indices.tolist()))]


class CalibrationImages:
    """Training images read lazily and resized to the model input, for the int8 calibration.

    Iterating yields (1, H, W, 3) float32 in [0, 1] and draws a progress bar on stderr.
    """

    def __init__(self, paths, input_size, progress=True):
        self.paths = list(paths)
        if not self.paths:
            raise ValueError("int8 calibration needs at least one image")
        self.input_size = tuple(input_size)
        self.progress = progress

    def __len__(self):
        return len(self.paths)

    def __iter__(self):
        from mdekd.data import read_rgb
        from mdekd.predict import resize_image

        # stderr: stdout is silenced during conversion
        for path in tqdm(self.paths, desc="int8 calibration", unit="image", disable=not self.progress,
                         file=sys.stderr):
            yield resize_image(read_rgb(path), self.input_size)[None]


@dataclasses.dataclass
class VerificationData:
    """Held-out images at the model size (N, H, W, 3) in [0, 1], optional truth (N, H, W, 1) metres."""

    images: np.ndarray
    depths: np.ndarray = None
    source: str = "random"


def verification_data(input_size, data_dir=None, dataset="mai2021", split="validation",
                      count=DEFAULT_NUM_VERIFICATION, seed=0):
    """Held-out images for ``verify``: the ``split`` pairs of ``data_dir`` (with truth) when it
    has that split, else the image files of ``data_dir`` (no truth), else seeded uniform noise.

    Images are resized (bilinear) to ``input_size``; truth is resized with nearest neighbour so
    no invalid (0) pixel is blended. Only the Keras/TFLite *difference* is judged, at model size.
    """
    import tensorflow as tf

    from mdekd.data import list_pairs, read_depth_png, read_rgb, resolve_layout
    from mdekd.predict import resize_image

    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        if os.path.isdir(os.path.join(data_dir, split)):
            pairs = evenly_spaced(list_pairs(data_dir, split, dataset), count)
            scale = resolve_layout(dataset).depth_scale or 1e-3
            images = np.stack([resize_image(read_rgb(rgb), input_size) for rgb, _ in pairs])
            depths = np.stack([
                tf.image.resize(read_depth_png(depth, scale), input_size, method="nearest").numpy()
                for _, depth in pairs
            ])
            return VerificationData(images, depths, f"{data_dir}/{split} ({len(pairs)} pairs)")
        if os.path.isdir(data_dir):
            paths = evenly_spaced(image_files(data_dir), count)
            images = np.stack([resize_image(read_rgb(p), input_size) for p in paths])
            return VerificationData(images, None, f"{data_dir} ({len(paths)} images, no truth)")
        raise FileNotFoundError(f"--validation_data: no such folder: {data_dir}")
    rng = np.random.default_rng(seed)
    images = rng.random((min(count, 4), *input_size, 3), dtype=np.float32)
    return VerificationData(images, None, f"uniform noise ({len(images)} images, seed {seed})")


# ---------------------------------------------------------------------------------------------
# Conversion and op inspection


def convert(model, mode, representative_images=None):
    """Convert a Keras depth model to a TFLite flatbuffer (bytes).

    model: ``keras.Model`` with a fixed (H, W, 3) input; dict outputs are reduced to ``depth``.
    mode: one of ``MODES``. representative_images: for ``int8`` only (required): an iterable of
    (H, W, 3) or (1, H, W, 3) float32 images in [0, 1] at the model size, iterated once.
    """
    import tensorflow as tf

    _check_mode(mode)
    if mode == "int8" and representative_images is None:
        raise ValueError(
            "--quantize int8 needs representative data (training images) for the activation "
            "ranges: pass --representative_data DIR"
        )
    network = depth_only_model(model)
    shape = tuple(network.input_shape)
    if len(shape) != 4 or None in shape[1:]:
        raise ValueError(
            f"export needs a fixed input size (None, H, W, 3); model {network.name!r} has {shape} "
            f"(toolchain.md §1). Rebuild it with input_shape=(H, W, 3) and copy the weights."
        )
    converter = tf.lite.TFLiteConverter.from_keras_model(network)
    if mode in ("fp16", "dynamic", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        def representative_dataset():
            for image in representative_images:
                yield [np.asarray(image, dtype=np.float32).reshape((1, *shape[1:]))]

        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # float32 input and output are kept (the converter's default): callers feed [0, 1] images.
    # Keras' export prints "Saved artifact at ..." and a list of captures on stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        return converter.convert()


def _operator_names():
    from ai_edge_litert import schema_py_generated as schema

    return {
        value: name
        for name, value in vars(schema.BuiltinOperator).items()
        if not name.startswith("_") and isinstance(value, int)
    }


def list_ops(tflite_bytes):
    """Operators of a TFLite flatbuffer: {op name: count} over all subgraphs.

    Read from the flatbuffer itself (the LiteRT schema), so it also works on a model the
    interpreter cannot load. Custom ops (Flex ones included) are named ``CUSTOM:<code>``.
    """
    from ai_edge_litert import schema_py_generated as schema

    try:
        model = schema.Model.GetRootAs(bytes(tflite_bytes), 0)
        names = _operator_names()
        codes = []
        for i in range(model.OperatorCodesLength()):
            code = model.OperatorCodes(i)
            # schema v3a: builtin_code (int32) superseded deprecated_builtin_code (int8), codes
            # below 127 may sit in either field, so the larger one is the real one.
            value = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = names.get(value, f"BUILTIN_{value}")
            if value == schema.BuiltinOperator.CUSTOM:
                custom = code.CustomCode()
                name = f"CUSTOM:{custom.decode() if custom else '?'}"
            codes.append(name)
        counts = {}
        for s in range(model.SubgraphsLength()):
            subgraph = model.Subgraphs(s)
            for o in range(subgraph.OperatorsLength()):
                name = codes[subgraph.Operators(o).OpcodeIndex()]
                counts[name] = counts.get(name, 0) + 1
    except Exception as error:  # a truncated/corrupt buffer fails somewhere inside flatbuffers
        raise ValueError(f"not a valid TFLite flatbuffer ({type(error).__name__}: {error})") from error
    return dict(sorted(counts.items()))


def forbidden_ops(op_names):
    """The names among ``op_names`` that the pip LiteRT runtime cannot run: CUSTOM and Flex ops."""
    return sorted(
        name for name in op_names
        if name.startswith("CUSTOM") or "FLEX" in name.upper() or name.startswith("DELEGATE")
    )


# ---------------------------------------------------------------------------------------------
# Verification


def relative_errors(reference, candidate):
    """Absolute (metres) and per-pixel relative differences of two depth arrays (reference > 0)."""
    reference = reference.astype(np.float64)
    difference = np.abs(candidate.astype(np.float64) - reference)
    relative = difference / np.maximum(np.abs(reference), 1e-12)
    return {
        "max_abs_diff": float(difference.max()),
        "mean_abs_diff": float(difference.mean()),
        "mean_relative_diff": float(relative.mean()),
        "p99_relative_diff": float(np.percentile(relative, 99)),
        "max_relative_diff": float(relative.max()),
        "mean_keras_depth": float(reference.mean()),
    }


def verify(tflite_bytes, keras_model, images, depths=None, mode="none",
           num_threads=DEFAULT_NUM_THREADS, tolerance=None):
    """Check a converted model against its Keras source; returns the report, raises ExportError.

    images: (N, H, W, 3) float32 [0, 1] at the model size; depths: optional (N, H, W, 1) metres
    truth (0 = invalid) for the design.md §2 metrics of both models. ``tolerance`` defaults to
    ``TOLERANCES[mode]``. Raises ExportError naming every failed check.
    """
    from mdekd.metrics import depth_metrics
    from mdekd.tflite_runner import KerasRunner

    _check_mode(mode)
    tolerance = tolerance or TOLERANCES[mode]
    ops = list_ops(tflite_bytes)
    bad_ops = forbidden_ops(ops)
    if bad_ops:
        raise ExportError(
            f"the {MODE_LABELS[mode]} conversion contains ops the LiteRT runtime cannot run: "
            f"{', '.join(bad_ops)} (toolchain.md §3); only builtin ops are accepted"
        )
    runner = TFLiteRunner(tflite_bytes, num_threads=num_threads)
    keras_runner = KerasRunner(keras_model)
    if runner.input_shape != keras_runner.input_shape:
        raise ExportError(
            f"TFLite input {runner.input_shape} differs from the Keras input {keras_runner.input_shape}"
        )
    images = np.asarray(images, dtype=np.float32)
    reference = keras_runner.predict(images)
    candidate = runner.predict(images)
    report = {
        "mode": MODE_LABELS[mode],
        "num_threads": int(num_threads),
        "num_images": int(len(images)),
        "ops": ops,
        **relative_errors(reference, candidate),
        "tolerance": dataclasses.asdict(tolerance),
    }
    failures = []
    if not np.all(np.isfinite(candidate)):
        failures.append(f"{int(np.sum(~np.isfinite(candidate)))} non-finite output values")
    for key, limit in (("mean_relative_diff", tolerance.mean_relative),
                       ("p99_relative_diff", tolerance.p99_relative),
                       ("max_relative_diff", tolerance.max_relative)):
        if limit is not None and not report[key] <= limit:
            failures.append(f"{key} {report[key]:.3g} > {limit:.3g}")
    if depths is not None:
        keras_metrics = depth_metrics(depths, reference)
        tflite_metrics = depth_metrics(depths, candidate)
        drift = {
            name: abs(tflite_metrics[name] - keras_metrics[name]) / max(abs(keras_metrics[name]), 1e-12)
            for name in ("si_rmse", "abs_rel")
        }
        drift["delta1_drop"] = keras_metrics["delta1"] - tflite_metrics["delta1"]
        report["metrics"] = {"keras": keras_metrics, "tflite": tflite_metrics, "drift": drift}
        for name in ("si_rmse", "abs_rel"):
            if not (math.isnan(keras_metrics[name]) or drift[name] <= tolerance.metric_drift):
                failures.append(f"{name} drift {drift[name]:.3g} > {tolerance.metric_drift:.3g} "
                                f"(keras {keras_metrics[name]:.4f}, tflite {tflite_metrics[name]:.4f})")
        if drift["delta1_drop"] > tolerance.delta1_drop:
            failures.append(f"delta1 drop {drift['delta1_drop']:.3g} > {tolerance.delta1_drop:.3g}")
    report["passed"] = not failures
    if failures:
        raise ExportError(
            f"the {MODE_LABELS[mode]} TFLite model disagrees with Keras on {len(images)} images: "
            + "; ".join(failures) + "; nothing was written"
        )
    return report


# ---------------------------------------------------------------------------------------------
# The whole export


def write_atomically(path, data):
    """Write bytes (or text) to ``path`` atomically (``mdekd.atomic``)."""
    write_bytes_atomically(path, data.encode() if isinstance(data, str) else data)


def check_output_writable(output):
    """Create the output folder if needed and check it is writable, before any long work."""
    directory = os.path.dirname(os.path.abspath(os.fspath(output)))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--output: cannot create the folder {directory} ({error.strerror})") from error
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"--output: the folder {directory} is not writable")


def read_run_config(model_path):
    """The ``run.json`` beside a trained model, or {} if there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "run.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable run.json ({error})") from error


def find_latest_student(runs_dir="runs"):
    """Newest ``<runs_dir>/*/best.keras`` whose run.json mode is student or distill."""
    runs_dir = os.fspath(runs_dir)
    candidates = []
    if os.path.isdir(runs_dir):
        for name in os.listdir(runs_dir):
            model = os.path.join(runs_dir, name, "best.keras")
            if not os.path.isfile(model):
                continue
            try:
                mode = read_run_config(model).get("mode")
            except ValueError:
                continue
            if mode in STUDENT_RUN_MODES:
                candidates.append((os.path.getmtime(model), model))
    if not candidates:
        raise FileNotFoundError(
            f"no trained student found: no {runs_dir}/*/best.keras with a run.json whose mode is "
            f"{' or '.join(STUDENT_RUN_MODES)}; pass --model"
        )
    return max(candidates)[1]


def default_output_path(model_path, mode):
    """``<model folder>/student_<label>.tflite``."""
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), f"student_{MODE_LABELS[mode]}.tflite")


def export_tflite(model_path, mode, output=None, representative_data=None, dataset=None,
                  num_calibration=DEFAULT_NUM_CALIBRATION, validation_data=None,
                  num_verification=DEFAULT_NUM_VERIFICATION, num_threads=DEFAULT_NUM_THREADS,
                  progress=True, log=print):
    """Convert, verify and write ``model_path`` (.keras) as a TFLite model; returns the report.

    Missing data folders and the dataset come from the run.json beside the model (``data_dir``,
    ``dataset``) when there is one. ``output`` defaults to ``default_output_path``; the report is
    written to ``<output>.json``. Nothing is written if anything fails.
    """
    _check_mode(mode)
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"--model: Keras model not found: {model_path}")
    run = read_run_config(model_path)
    dataset = dataset or run.get("dataset") or "mai2021"
    if representative_data is None and mode == "int8":
        representative_data = run.get("data_dir")
    if validation_data is None:
        validation_data = run.get("data_dir")
    if mode == "int8" and representative_data is None:
        raise ValueError(
            "--quantize int8 needs representative data (training images) for the activation ranges: "
            "pass --representative_data DIR (a dataset root with train/rgb, or a folder of images)"
        )
    output = os.fspath(output) if output else default_output_path(model_path, mode)
    check_output_writable(output)
    calibration_paths = None
    if mode == "int8":
        calibration_paths = evenly_spaced(image_files(representative_data, dataset), num_calibration)
        check_images(calibration_paths)  # a stray non-image fails now, not minutes into conversion

    model = load_keras_model(model_path)
    network = depth_only_model(model)
    input_size = tuple(network.input_shape[1:3])
    calibration = None
    if calibration_paths is not None:
        calibration = CalibrationImages(calibration_paths, input_size, progress=progress)
        log(f"calibrating int8 on {len(calibration)} images from {representative_data}")
    tflite_bytes = convert(network, mode, calibration)

    data = verification_data(input_size, validation_data, dataset, count=num_verification)
    log(f"verifying the {MODE_LABELS[mode]} model against Keras on {data.source}")
    report = verify(tflite_bytes, network, data.images, data.depths, mode=mode, num_threads=num_threads)
    report.update({
        "source_model": os.path.abspath(model_path),
        "output": os.path.abspath(output),
        "input_shape": [int(n) for n in network.input_shape[1:]],
        "tflite_bytes": len(tflite_bytes),
        "keras_file_bytes": os.path.getsize(model_path),
        "verification_data": data.source,
        "calibration": (
            {"source": os.fspath(representative_data), "num_images": len(calibration_paths)}
            if calibration_paths else None
        ),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    })
    write_atomically(output, tflite_bytes)
    write_atomically(output + ".json", json.dumps(report, indent=2, default=_json_default) + "\n")
    return report


def _versions():
    import importlib.metadata

    versions = {}
    for package in ("tensorflow", "keras", "ai-edge-litert"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def summarize(report):
    """A few human-readable lines about an export report."""
    lines = [
        f"wrote {report['output']} ({report['tflite_bytes'] / 1e6:.2f} MB, {report['mode']}, "
        f"input {'x'.join(map(str, report['input_shape']))})",
        f"ops: {', '.join(f'{k}×{v}' for k, v in report['ops'].items())}",
        f"vs Keras on {report['verification_data']}: max|Δ| {report['max_abs_diff']:.3g} m, "
        f"mean|Δ| {report['mean_abs_diff']:.3g} m; relative per pixel: mean {100 * report['mean_relative_diff']:.3g} %, "
        f"p99 {100 * report['p99_relative_diff']:.3g} %, max {100 * report['max_relative_diff']:.3g} %",
    ]
    if "metrics" in report:
        from mdekd.metrics import format_metrics_table

        metrics = report["metrics"]
        lines.append(format_metrics_table({"keras": metrics["keras"], "tflite": metrics["tflite"]}))
    return "\n".join(lines)
