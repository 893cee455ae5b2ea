"""TFLite export of a trained depth model: conversion, verification against Keras, atomic write.

design.md §5. The deployed graph (``mdekd.models.deploy_model``: depth only, head before the last
upsampling) is converted at the model's fixed input size from a SavedModel with one signature,
``image`` -> ``depth`` (toolchain.md §2, §21; ``from_concrete_functions`` with a ``trackable_obj``
writes a model without weights that outputs NaN). The modes (``none``/fp32, ``fp16``, ``dynamic``,
``int8``) and their gates are the table of ``mdekd.quantization``; int8 keeps the output tail in
float (toolchain.md §19).

Every conversion is then loaded with LiteRT (XNNPACK, explicit thread count), refused if it holds
a CUSTOM or Flex op (toolchain.md §3: the pip runtime cannot run them), run on held-out images and
compared with the Keras model. Only a model within its mode's tolerance is written, atomically
(``mdekd.atomic``), with a JSON report beside it (``<output>.json``).
"""

import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import re
import sys

import numpy as np
from tqdm import tqdm

from mdekd import run_folder
from mdekd.atomic import prepare_file, write_bytes_atomically
from mdekd.quantization import configure_converter, get_mode
from mdekd.tflite_runner import DEFAULT_NUM_THREADS, TFLiteRunner, depth_only_model, load_depth_model

DEFAULT_NUM_CALIBRATION = 100  # toolchain.md §9: calibrate int8 on >= 100 real training images
DEFAULT_NUM_VERIFICATION = 16


class ExportError(ValueError):
    """A conversion that must not be written: forbidden ops, or outputs outside the tolerance."""


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
    from mdekd.data import IMAGE_EXTENSIONS, list_images, list_pairs

    candidates = [os.path.join(directory, "train", "rgb"), os.path.join(directory, "rgb"), directory]
    for folder in candidates:
        if os.path.isdir(folder):
            try:
                return list_images(folder, flag="--representative_data", recursive=False)
            except ValueError:
                continue  # no image directly in this folder: try the next candidate
    if dataset is not None and os.path.isdir(os.path.join(directory, "train")):
        return [rgb for rgb, _ in list_pairs(directory, "train", dataset)]
    raise ValueError(
        f"--representative_data: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
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
    """Held-out images at the model size (N, H, W, 3) in [0, 1], where they came from, and the
    dataset root whose split they are (``split_root``; None for loose images or noise)."""

    images: np.ndarray
    source: str = "random"
    split_root: str = None


def verification_data(input_size, data_dir=None, dataset="mai2021", split="validation",
                      count=DEFAULT_NUM_VERIFICATION, seed=0, **layout_options):
    """Held-out images for ``verify``: the ``split`` pairs of ``data_dir`` when it has that split,
    else the image files of ``data_dir``, else seeded uniform noise; resized (bilinear) to
    ``input_size``. Only the Keras/TFLite *difference* is judged on them, at model size; the
    metrics are compared by ``compare_metrics`` at the truth's own size.
    """
    from mdekd.data import list_pairs
    from mdekd.predict import load_resized_images

    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        if os.path.isdir(os.path.join(data_dir, split)):
            pairs = evenly_spaced(list_pairs(data_dir, split, dataset, **layout_options), count)
            images = load_resized_images([rgb for rgb, _ in pairs], input_size)
            return VerificationData(images, f"{data_dir}/{split} ({len(pairs)} pairs)", data_dir)
        if os.path.isdir(data_dir):
            paths = evenly_spaced(image_files(data_dir), count)
            images = load_resized_images(paths, input_size)
            return VerificationData(images, f"{data_dir} ({len(paths)} images, no truth)")
        raise FileNotFoundError(f"--validation_data: no such folder: {data_dir}")
    rng = np.random.default_rng(seed)
    images = rng.random((min(count, 4), *input_size, 3), dtype=np.float32)
    return VerificationData(images, f"uniform noise ({len(images)} images, seed {seed})")


# ---------------------------------------------------------------------------------------------
# Conversion and op inspection


def convert(model, mode, representative_images=None):
    """Convert a Keras depth model to a TFLite flatbuffer (bytes).

    model: ``keras.Model`` with a fixed (H, W, 3) input; dict outputs are reduced to ``depth``.
    mode: a ``mdekd.quantization`` mode name. representative_images: for ``int8`` only (required):
    a re-iterable (a list, ``CalibrationImages``) of (H, W, 3) or (1, H, W, 3) float32 images in
    [0, 1] at the model size.
    """
    from mdekd.models import deploy_model
    from mdekd.quantization_aware import is_quantization_aware, without_fake_quant

    quant_mode = get_mode(mode)
    # A quantisation-aware model is already the deployed graph and holds its int8 ranges; the
    # other modes convert its float network (mdekd.quantization_aware).
    aware = is_quantization_aware(model)
    if aware:
        network = depth_only_model(model) if quant_mode.integer_only else without_fake_quant(model)
    else:
        network = deploy_model(model) if isinstance(model.output, dict) else model
    shape = tuple(network.input_shape)
    if len(shape) != 4 or None in shape[1:]:
        raise ValueError(
            f"export needs a fixed input size (None, H, W, 3); model {network.name!r} has {shape} "
            f"(toolchain.md §1). Rebuild it with input_shape=(H, W, 3) and copy the weights."
        )
    def representative_dataset():
        for image in representative_images:
            yield [np.asarray(image, dtype=np.float32).reshape((1, *shape[1:]))]

    # Keras' export prints "Saved artifact at ..." and a list of captures on stdout.
    with contextlib.redirect_stdout(io.StringIO()), _saved_model(network) as folder:
        converter = _converter(folder)
        configure_converter(converter, quant_mode,
                            None if representative_images is None else representative_dataset,
                            ranges_in_model=aware)
        if quant_mode.float_tail and representative_images is not None and not aware:
            return _quantize_selectively(converter, folder, network, representative_dataset)
        return converter.convert()


SIGNATURE_KEY = "serving_default"


@contextlib.contextmanager
def _saved_model(network):
    """A temporary SavedModel folder of ``network`` with one signature that reads ``image``
    (1, H, W, 3) and returns ``depth`` (1, H, W, 1) (``keras.export.ExportArchive``, toolchain.md
    §2, §21); it lives for as long as the context. Written once per conversion: tracing the model is
    the slow part, and the float-tail path converts it twice."""
    import tempfile

    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint(SIGNATURE_KEY, lambda image: {"depth": network(image, training=False)},
                         input_signature=[tf.TensorSpec((1, *network.input_shape[1:]), tf.float32,
                                                        name="image")])
    with tempfile.TemporaryDirectory(prefix="mdekd-export-") as folder:
        archive.write_out(folder, verbose=False)
        yield folder


def _converter(saved_model_folder):
    """A fresh ``TFLiteConverter`` for the ``image -> depth`` signature of a ``_saved_model``."""
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_saved_model(saved_model_folder, signature_keys=[SIGNATURE_KEY])


def _quantize_selectively(converter, saved_model_folder, network, representative_dataset):
    """Selective quantisation: everything int8 except ``models.deploy.output_tail`` and the layers
    of ``models.deploy.float_under_int8``, via TF's ``QuantizationDebugger`` deny-list
    (docs/toolchain.md §19, §23). A model without either is quantised fully."""
    import tensorflow as tf

    from mdekd.models.deploy import float_under_int8, output_tail

    tail, inner = output_tail(network), float_under_int8(network)
    if not tail and not inner:
        return converter.convert()
    float_tflite = _converter(saved_model_folder).convert()
    nodes = tail_tensors(float_tflite, tail) if tail else []
    nodes += [name for name in layer_tensors(float_tflite, inner) if name not in nodes]
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=nodes)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative_dataset, debug_options=options)
    return debugger.get_nondebug_quantized_model()


def _operator_names():
    from ai_edge_litert import schema_py_generated as schema

    return {
        value: name
        for name, value in vars(schema.BuiltinOperator).items()
        if not name.startswith("_") and isinstance(value, int)
    }


def list_operators(tflite_bytes):
    """The operators of a TFLite flatbuffer in execution order, over all subgraphs: a list of
    ``(op name, [output tensor names])``.

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
        operators = []
        for s in range(model.SubgraphsLength()):
            subgraph = model.Subgraphs(s)
            for o in range(subgraph.OperatorsLength()):
                operator = subgraph.Operators(o)
                outputs = [subgraph.Tensors(operator.Outputs(k)).Name().decode()
                           for k in range(operator.OutputsLength())]
                operators.append((codes[operator.OpcodeIndex()], outputs))
    except Exception as error:  # a truncated/corrupt buffer fails somewhere inside flatbuffers
        raise ValueError(f"not a valid TFLite flatbuffer ({type(error).__name__}: {error})") from error
    return operators


def list_ops(tflite_bytes):
    """Operators of a TFLite flatbuffer: {op name: count} over all subgraphs (``list_operators``)."""
    counts = {}
    for name, _ in list_operators(tflite_bytes):
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _layer_pattern(layer_names):
    """Matches the TFLite tensor names that Keras layers ``layer_names`` give their ops."""
    return re.compile(r"/(" + "|".join(map(re.escape, layer_names)) + r")(_\d+)?/")


def tail_tensors(float_tflite, layer_names):
    """Output tensor names of the ops of a float conversion from the first op that computes one of
    ``layer_names`` (Keras layers) to the end: the float tail of a selectively quantised model."""
    pattern = _layer_pattern(layer_names)
    operators = list_operators(float_tflite)
    start = next((i for i, (_, outputs) in enumerate(operators)
                  if any(pattern.search(name) for name in outputs)), len(operators))
    return [name for _, outputs in operators[start:] for name in outputs]


def layer_tensors(float_tflite, layer_names):
    """Output tensor names of the ops of a float conversion that compute one of ``layer_names``."""
    pattern = _layer_pattern(layer_names)
    return [name for _, outputs in list_operators(float_tflite) for name in outputs
            if pattern.search(name)]


def gpu_delegate_compatibility(tflite_bytes):
    """What TFLite's model analyzer says of running ``tflite_bytes`` on the GPU delegate:
    ``{"compatible": bool, "summary": "GPU delegate: compatible" | "GPU delegate: <failing ops>",
    "issues": [analyzer lines]}``. A static check of ops and types (the analyzer's own caveat:
    runtime incompatibilities remain possible); no GPU is needed."""
    import tensorflow as tf

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        tf.lite.experimental.Analyzer.analyze(model_content=bytes(tflite_bytes), gpu_compatibility=True)
    lines = text.getvalue().splitlines()
    issues = [line.strip() for line in lines if "GPU COMPATIBILITY WARNING" in line]
    compatible = not issues and any("looks compatible with GPU delegate" in line for line in lines)
    summary = "GPU delegate: compatible" if compatible else "GPU delegate: " + ("; ".join(issues) or "not compatible")
    return {"compatible": compatible, "summary": summary, "issues": issues}


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


def verify(tflite_bytes, keras_model, images, mode="none", num_threads=DEFAULT_NUM_THREADS,
           tolerance=None):
    """Check a converted model against its Keras source; returns the report, raises ExportError.

    Refuses CUSTOM/Flex ops, then compares the two models per pixel on ``images`` ((N, H, W, 3)
    float32 [0, 1] at the model size). ``tolerance`` defaults to the mode's
    (``mdekd.quantization``). Raises ExportError naming every failed check.
    """
    from mdekd.tflite_runner import KerasRunner

    quant_mode = get_mode(mode)
    tolerance = tolerance or quant_mode.tolerance
    ops = list_ops(tflite_bytes)
    bad_ops = forbidden_ops(ops)
    if bad_ops:
        raise ExportError(
            f"the {quant_mode.label} conversion contains ops the LiteRT runtime cannot run: "
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
        "mode": quant_mode.label,
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
    report["passed"] = not failures
    if failures:
        raise ExportError(
            f"the {quant_mode.label} TFLite model disagrees with Keras on {len(images)} images: "
            + "; ".join(failures) + "; nothing was written"
        )
    return report


def compare_metrics(tflite_bytes, keras_model, data_dir, dataset="mai2021", mode="none",
                    num_images=DEFAULT_NUM_VERIFICATION, num_threads=DEFAULT_NUM_THREADS,
                    tolerance=None, **layout_options):
    """design.md §2 metrics of both models on the first ``num_images`` validation pairs of
    ``data_dir``, by ``mdekd.evaluate.evaluate_model`` (each truth at its own size); returns
    ``{"keras", "tflite", "drift"}``, raises ExportError if the TFLite metrics drift beyond the
    mode's tolerance."""
    from mdekd.evaluate import evaluate_model

    quant_mode = get_mode(mode)
    tolerance = tolerance or quant_mode.tolerance
    options = dict(dataset=dataset, max_images=num_images, num_threads=num_threads, **layout_options)
    keras_metrics = evaluate_model(keras_model, data_dir, **options)["metrics"]
    tflite_metrics = evaluate_model(TFLiteRunner(tflite_bytes, num_threads=num_threads), data_dir,
                                    **options)["metrics"]
    drift = {
        name: abs(tflite_metrics[name] - keras_metrics[name]) / max(abs(keras_metrics[name]), 1e-12)
        for name in ("si_rmse", "abs_rel")
    }
    drift["delta1_drop"] = keras_metrics["delta1"] - tflite_metrics["delta1"]
    failures = [f"{name} drift {drift[name]:.3g} > {tolerance.metric_drift:.3g} (keras "
                f"{keras_metrics[name]:.4f}, tflite {tflite_metrics[name]:.4f})"
                for name in ("si_rmse", "abs_rel")
                if not (math.isnan(keras_metrics[name]) or drift[name] <= tolerance.metric_drift)]
    if drift["delta1_drop"] > tolerance.delta1_drop:
        failures.append(f"delta1 drop {drift['delta1_drop']:.3g} > {tolerance.delta1_drop:.3g}")
    if failures:
        raise ExportError(f"the {quant_mode.label} TFLite model's metrics on {data_dir} drift from "
                          "Keras': " + "; ".join(failures) + "; nothing was written")
    return {"keras": keras_metrics, "tflite": tflite_metrics, "drift": drift}


# ---------------------------------------------------------------------------------------------
# The whole export


def write_atomically(path, data):
    """Write bytes (or text) to ``path`` atomically (``mdekd.atomic``)."""
    write_bytes_atomically(path, data.encode() if isinstance(data, str) else data)


def default_output_path(model_path, mode, input_size=None, quantization_aware=False):
    """``<model folder>/<teacher|student>[_qat]_<label>[_<h>x<w>].tflite``, the network kind from its
    run.json; ``_qat`` marks a quantisation-aware source, the suffix a reduced network input
    (``--input_size``)."""
    kind = run_folder.network_kind(run_folder.read_run_config(model_path))
    kind += "_qat" if quantization_aware else ""
    suffix = f"_{input_size[0]}x{input_size[1]}" if input_size else ""
    return os.path.join(os.path.dirname(os.path.abspath(model_path)),
                        f"{kind}_{get_mode(mode).label}{suffix}.tflite")


def parse_input_size(text):
    """``--input_size`` 'H,W' -> (H, W); ValueError naming the flag otherwise."""
    try:
        height, width = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--input_size: expected 'H,W' (two integers, multiples of 32, e.g. 256,320), "
                         f"got {text!r}") from None
    return height, width


def export_tflite(model_path, mode, output=None, representative_data=None, dataset=None,
                  depth_scale=None, num_calibration=DEFAULT_NUM_CALIBRATION, validation_data=None,
                  num_verification=DEFAULT_NUM_VERIFICATION, num_threads=DEFAULT_NUM_THREADS,
                  input_size=None, progress=True, log=print):
    """Convert, verify and write ``model_path`` (.keras) as a TFLite model; returns the report.

    Missing data folders, the dataset and its depth scale come from the run.json beside the model
    (``data_dir``, ``dataset``, ``depth_scale``) when there is one; ``depth_scale`` (metres per
    stored unit) is required to score a ``folder`` dataset, as in ``mdekd.evaluate``. ``output``
    defaults to ``default_output_path``; the report is written to ``<output>.json``. Nothing is
    written if anything fails. ``input_size`` (H, W): run the network at that smaller size inside
    the model's full-size input and output (``mdekd.models.deploy.reduced_resolution_model``).
    """
    from mdekd.data import resolve_layout
    from mdekd.models.deploy import reduced_resolution_model
    from mdekd.quantization_aware import is_quantization_aware, without_fake_quant

    quant_mode = get_mode(mode)
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"--model: Keras model not found: {model_path}")
    run = run_folder.read_run_config(model_path)
    dataset = dataset or run.get("dataset") or "mai2021"
    depth_scale = depth_scale if depth_scale is not None else run.get("depth_scale")
    layout = {} if depth_scale is None else {"depth_scale": depth_scale}
    if validation_data is None:
        validation_data = run.get("data_dir")
    if output:  # a bad --output fails before the model is read
        output = os.fspath(output)
        prepare_file(output, "--output")

    model = load_depth_model(model_path)
    # A quantisation-aware model holds its int8 ranges (no calibration); its other exports are of
    # its float network (mdekd.quantization_aware).
    aware = is_quantization_aware(model)
    if not output:
        output = default_output_path(model_path, mode, input_size, aware)
        prepare_file(output, "--output")
    calibrate = quant_mode.integer_only and not aware
    if representative_data is None and calibrate:
        representative_data = run.get("data_dir")
    if calibrate and representative_data is None:
        raise ValueError(
            f"--quantize {mode} needs representative data (training images) for the activation ranges: "
            "pass --representative_data DIR (a dataset root with train/rgb, or a folder of images)"
        )
    calibration_paths = None
    if calibrate:
        calibration_paths = evenly_spaced(image_files(representative_data, dataset), num_calibration)
        check_images(calibration_paths)  # a stray non-image fails now, not minutes into conversion
    if aware and input_size:
        raise ValueError("--input_size: a quantisation-aware model holds int8 ranges for its own input "
                         "size; export it without --input_size")
    if aware and not quant_mode.integer_only:
        model = without_fake_quant(model)
    network = depth_only_model(model)
    full_size = tuple(network.input_shape[1:3])
    if input_size:
        model = network = reduced_resolution_model(model, input_size)  # verified against this graph
    data = verification_data(full_size, validation_data, dataset, count=num_verification, **layout)
    if data.split_root is not None and resolve_layout(dataset, **layout).depth_scale is None:
        raise ValueError(f"--depth_scale: dataset {dataset!r} needs the metres per stored depth unit "
                         f"to score the truth of {data.split_root}")
    calibration = None
    if calibration_paths is not None:
        calibration = CalibrationImages(calibration_paths, full_size, progress=progress)
        log(f"calibrating int8 on {len(calibration)} images from {representative_data}")
    tflite_bytes = convert(model, mode, calibration)  # the deploy graph (mdekd.models.deploy)

    log(f"verifying the {quant_mode.label} model against Keras on {data.source}")
    report = verify(tflite_bytes, network, data.images, mode=mode, num_threads=num_threads)
    if data.split_root is not None:
        report["metrics"] = compare_metrics(tflite_bytes, network, data.split_root, dataset, mode=mode,
                                            num_images=num_verification, num_threads=num_threads,
                                            **layout)
    report.update({
        "source_model": os.path.abspath(model_path),
        "output": os.path.abspath(output),
        "input_shape": [int(n) for n in network.input_shape[1:]],
        "network_input_size": list(input_size or full_size),
        "tflite_bytes": len(tflite_bytes),
        "keras_file_bytes": os.path.getsize(model_path),
        "verification_data": data.source,
        "gpu_delegate": gpu_delegate_compatibility(tflite_bytes),
        "calibration": (
            {"source": os.fspath(representative_data), "num_images": len(calibration_paths)}
            if calibration_paths else None
        ),
        "quantization_aware": aware,
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
        report["gpu_delegate"]["summary"] if "gpu_delegate" in report else "GPU delegate: not checked",
        f"vs Keras on {report['verification_data']}: max|Δ| {report['max_abs_diff']:.3g} m, "
        f"mean|Δ| {report['mean_abs_diff']:.3g} m; relative per pixel: mean {100 * report['mean_relative_diff']:.3g} %, "
        f"p99 {100 * report['p99_relative_diff']:.3g} %, max {100 * report['max_relative_diff']:.3g} %",
    ]
    if "metrics" in report:
        from mdekd.metrics import format_metrics_table

        metrics = report["metrics"]
        lines.append(format_metrics_table({"keras": metrics["keras"], "tflite": metrics["tflite"]}))
    return "\n".join(lines)
