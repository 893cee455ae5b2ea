"""The quantisation-aware model: the int8 TFLite network written in Keras, and its fine-tuning (QAT).

docs/design.md §5. Post-training int8 rounds every activation to 256 levels, and that rounding
noise reaches the depth (2–4 % per pixel). This module builds the Keras model that computes what
the int8 model computes, so int8 behaviour can be measured, trained through and exported from Keras:

1. ``quantization_aware_model(model)``: the deployed graph (``mdekd.models.deploy_model``) with a
   ``FakeQuant`` after every tensor that the int8 TFLite model stores in int8: after each ReLU (a
   convolution's BatchNorm and ReLU fold into it, so only their end gets one), each skip addition,
   the attention layers and the head. Padding and upsampling keep their input's scale in int8. The
   float tail (``output_tail``) has none, nor has the input stage: the image and its normalisation
   stay float, so the stem convolution reads them unrounded (no int8 range puts the normalised
   8-bit levels 2k/255 − 1 on levels that include 0; measured: the largest single source of the
   int8 deviation, design.md §5) and runs in float, 1.5 % of FastDepth's MACs.
2. ``calibrate``: the ranges from images with the rounding off, the min/max that post-training
   calibration takes.
3. ``fine_tune`` (optional, ``--steps``): the float student is the teacher. Loss = mean
   |log d_qat − log d_float| per pixel, i.e. the relative deviation export gates; images only, no
   depth labels. BatchNorm is folded (TFLite folds its moving statistics into the convolution) and
   the ranges stay fixed.

The result is a ``.keras`` model whose ``depth`` output is what the int8 TFLite model computes:
``export.py --quantize int8`` converts it with the ranges it holds (no calibration images needed)
and verifies the int8 model against it; the other modes export it with the fake quantisation
removed (``without_fake_quant``).

    python -m mdekd.quantization_aware --model runs/x/best.keras --images data/quickstart [--steps 300]
    python export.py --model runs/x/best_qat.keras --quantize int8

Built and measured for FastDepth (ReLU convolutions, additive skips). A MobileViT student converts
too, but the tensors inside its transformer blocks and swish activations get no range and stay
float (63 float islands in MobileViT-XXS + dual): use post-training int8 for it.

Measured (README, phone path): the int8 TFLite model matches the calibrated quantisation-aware Keras
model to ~1 % mean per pixel; fine-tuning did not bring either closer to the float student, since
the straight-through gradient treats rounding as identity and cannot see the (pseudo-random)
rounding noise it would have to cancel, so ``--steps`` defaults to 0 (calibration only).
"""

import os
import sys

import keras
import numpy as np

from mdekd.models import deploy_model
from mdekd.models.common import iter_layers
from mdekd.models.deploy import UPSAMPLING_LAYERS, output_tail
from mdekd.models.layers import FakeQuant, FakeQuantConv2D, FakeQuantDepthwiseConv2D

DEFAULT_STEPS = 0  # fine-tuning did not bring int8 closer to the float student (design.md §5)
DEFAULT_LEARNING_RATE = 1e-4
DEFAULT_BATCH_SIZE = 8
DEFAULT_NUM_IMAGES = 256

# TFLite folds a BatchNormalization into the convolution before it and fuses a ReLU into the op
# before it: a tensor that only feeds these never exists in the int8 model.
_FOLDED_INTO_NEXT = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.BatchNormalization)
_FOLDING = (keras.layers.BatchNormalization, keras.layers.ReLU)


# layers whose output gets no range of its own: the input stage, which stays float (module
# docstring), and those whose int8 kernel writes with its input's scale
_NO_OWN_RANGE = (keras.layers.InputLayer, keras.layers.Rescaling, FakeQuant, keras.layers.ZeroPadding2D,
                 keras.layers.Reshape, *UPSAMPLING_LAYERS)


def _consumers(layer):
    """The layers that read ``layer``'s output, each once (a layer shared by several graphs, as
    ``deploy_model``'s copy shares them, has a node per graph)."""
    return list({id(node.operation): node.operation for node in layer._outbound_nodes}.values())


def int8_tensor_layers(model):
    """Names of the leaf layers (nested ones included) of the deployed ``model`` whose output is an
    int8 tensor of the int8 TFLite model, in graph order: where ``quantization_aware_model`` puts
    a ``FakeQuant``."""
    tail = set(output_tail(model))
    names = []
    for layer in iter_layers(model):
        if isinstance(layer, _NO_OWN_RANGE) or layer.name in tail:
            continue
        consumers = _consumers(layer)
        if isinstance(layer, _FOLDED_INTO_NEXT) and consumers and all(
                isinstance(consumer, _FOLDING) for consumer in consumers):
            continue
        names.append(layer.name)
    return names


def is_quantization_aware(model):
    """Whether ``model`` holds ``FakeQuant`` layers (made by ``quantization_aware_model``)."""
    return any(isinstance(layer, FakeQuant) for layer in iter_layers(model))


def fake_quant_layers(model):
    """The ``FakeQuant`` layers of ``model``, nested ones included."""
    return [layer for layer in iter_layers(model) if isinstance(layer, FakeQuant)]


def quantization_aware_model(model, float_layers=()):
    """The deployed graph of the student ``model`` as the int8 TFLite model computes it.

    (B, H, W, 3) RGB in [0, 1] -> {"depth": (B, H, W, 1) metres}. Each BatchNormalization is folded
    into the convolution before it (its moving statistics, as TFLite folds it), the convolutions
    round their kernels to int8 per channel (``FakeQuantConv2D``, ``FakeQuantDepthwiseConv2D``), and
    a ``FakeQuant`` follows every ``int8_tensor_layers`` output. The weights are a
    copy; the ranges start at [0, 0] (call ``calibrate``). ``float_layers``: names of layers whose
    output stays float (no ``FakeQuant``), so that the ops writing and reading it run in float
    between a DEQUANTIZE and a QUANTIZE, e.g. FastDepth's first blocks (README, phone path: what
    each costs and saves).
    """
    if is_quantization_aware(model):
        raise ValueError(f"model {model.name!r} is already quantisation-aware")
    deployed = deploy_model(model)
    quantized = set(int8_tensor_layers(deployed))
    unknown = set(float_layers) - {layer.name for layer in iter_layers(deployed)}
    if unknown:
        raise ValueError(f"--float_layers: no layer {', '.join(sorted(unknown))} in {model.name!r}; "
                         f"int8 tensors are the outputs of: {', '.join(int8_tensor_layers(deployed))}")
    quantized -= set(float_layers)
    folded = _batchnorm_after_convolution(deployed)  # conv name -> its BatchNormalization
    folded_batchnorms = {batchnorm.name for batchnorm in folded.values()}

    def clone_function(layer):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            return _fake_quant_convolution(layer, folded.get(layer.name))
        return layer  # weightless or not folded: shared with the deployed copy

    def call_function(layer, *args, **kwargs):
        outputs = args[0] if layer.name in folded_batchnorms else layer(*args, **kwargs)
        return FakeQuant(name=f"{layer.name}_quant")(outputs) if layer.name in quantized else outputs

    aware = keras.models.clone_model(deployed, clone_function=clone_function,
                                     call_function=call_function, recursive=True)
    for layer in iter_layers(aware):
        if isinstance(layer, keras.layers.BatchNormalization):  # one not after a convolution
            layer.trainable = False
    return keras.Model(aware.inputs, {"depth": aware.outputs[0]}, name=f"{model.name}_qat")


def _batchnorm_after_convolution(model):
    """{convolution name: BatchNormalization} for each convolution whose only consumer is a
    BatchNormalization (whose only input it is): the pairs TFLite folds."""
    pairs = {}
    for layer in iter_layers(model):
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            continue
        consumers = _consumers(layer)
        if len(consumers) == 1 and isinstance(consumers[0], keras.layers.BatchNormalization):
            pairs[layer.name] = consumers[0]
    return pairs


def _fake_quant_convolution(layer, batchnorm=None):
    """A built ``FakeQuantConv2D``/``FakeQuantDepthwiseConv2D`` with ``layer``'s configuration and
    weights, ``batchnorm`` (inference mode) folded in: w·s per output channel, (b − mean)·s + beta,
    s = gamma / sqrt(var + eps)."""
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    if depthwise and layer.depth_multiplier != 1:
        raise ValueError(f"layer {layer.name!r}: quantisation-aware depthwise needs depth_multiplier 1")
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype("float64")  # fold in float64
    channels = kernel.shape[2] if depthwise else kernel.shape[-1]
    bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else np.zeros(channels, "float32")
    if batchnorm is not None:
        weight = lambda v, default: np.full(channels, default) if v is None else (  # noqa: E731
            keras.ops.convert_to_numpy(v).astype("float64"))
        scale = weight(batchnorm.gamma, 1.0) / np.sqrt(
            keras.ops.convert_to_numpy(batchnorm.moving_variance) + batchnorm.epsilon)
        mean = keras.ops.convert_to_numpy(batchnorm.moving_mean)
        bias = (bias - mean) * scale + weight(batchnorm.beta, 0.0)
        kernel = kernel * (scale[:, None] if depthwise else scale)
    config = {**layer.get_config(), "use_bias": True}
    clone = (FakeQuantDepthwiseConv2D if depthwise else FakeQuantConv2D).from_config(config)
    clone.build(layer.input.shape)
    clone.set_weights([kernel.astype("float32"), bias.astype("float32")])
    return clone


def without_fake_quant(model):
    """``model`` with its ``FakeQuant`` layers removed and float kernels (the float network; the
    convolutions are copies, the other layers shared).

    (B, H, W, 3) -> (B, H, W, 1) metres."""
    float_classes = {FakeQuantConv2D: keras.layers.Conv2D,
                     FakeQuantDepthwiseConv2D: keras.layers.DepthwiseConv2D}

    def clone_function(layer):
        if type(layer) not in float_classes:
            return layer
        clone = float_classes[type(layer)].from_config(layer.get_config())
        clone.build(layer.input.shape)
        clone.set_weights(layer.get_weights())
        return clone

    def call_function(layer, *args, **kwargs):
        return args[0] if isinstance(layer, FakeQuant) else layer(*args, **kwargs)

    depth = model.output["depth"] if isinstance(model.output, dict) else model.output
    graph = keras.Model(model.inputs, depth)
    stripped = keras.models.clone_model(graph, clone_function=clone_function,
                                        call_function=call_function, recursive=True)
    return keras.Model(stripped.inputs, stripped.outputs[0], name=f"{model.name}_float")


def calibrate(model, images, batch_size=DEFAULT_BATCH_SIZE, quantile=None):
    """Set every ``FakeQuant`` range of ``model`` to the min/max (0 included) of its float input
    over ``images`` (N, H, W, 3) in [0, 1], with all rounding off: post-training calibration.
    ``quantile`` q: the widest of the batches' (1 − q, q) quantiles instead, clipping outliers."""
    layers = fake_quant_layers(model)
    for layer in layers:
        layer.range_min.assign(0.0)
        layer.range_max.assign(0.0)
        layer.observing = True if quantile is None else float(quantile)
    try:
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size], training=False)
    finally:
        for layer in layers:
            layer.observing = False


def relative_deviation(model, reference, images, batch_size=DEFAULT_BATCH_SIZE):
    """``mdekd.export.relative_errors`` of ``model``'s depth against ``reference``'s on ``images``
    (N, H, W, 3): the per-pixel statistics export gates (``mean_relative_diff``, ...)."""
    from mdekd.export import relative_errors

    depth = lambda network: np.asarray(_depth(network.predict(images, batch_size=batch_size,  # noqa: E731
                                                               verbose=0)))
    return relative_errors(depth(reference), depth(model))


def _depth(outputs):
    return outputs["depth"] if isinstance(outputs, dict) else outputs


def fine_tune(model, reference, images, steps=DEFAULT_STEPS, learning_rate=DEFAULT_LEARNING_RATE,
              batch_size=DEFAULT_BATCH_SIZE, seed=0, progress=True):
    """Fine-tune the calibrated quantisation-aware ``model`` to reproduce ``reference`` (the float
    depth model) on ``images`` (N, H, W, 3) in [0, 1], randomly flipped left-right; returns the loss
    of each step (mean |log d_model − log d_reference|)."""
    import tensorflow as tf
    from tqdm import tqdm

    optimizer = keras.optimizers.Adam(learning_rate)
    variables = model.trainable_variables

    @tf.function
    def train_step(batch):
        target = tf.math.log(_depth(reference(batch, training=False)))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.abs(tf.math.log(_depth(model(batch, training=True))) - target))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in tqdm(range(steps), desc="quantisation-aware fine-tuning", unit="step",
                  disable=not progress or not steps, file=sys.stderr):
        batch = images[rng.choice(len(images), size=min(batch_size, len(images)), replace=False)]
        flip = rng.random(len(batch)) < 0.5
        batch = np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)
        losses.append(float(train_step(tf.constant(batch))))
    return losses


def fine_tune_file(model_path, images=None, output=None, dataset=None, steps=DEFAULT_STEPS,
                   learning_rate=DEFAULT_LEARNING_RATE, batch_size=DEFAULT_BATCH_SIZE,
                   num_images=DEFAULT_NUM_IMAGES, validation_data=None, calibration_quantile=None,
                   float_layers=(), seed=0, progress=True, log=print):
    """Make the student ``model_path`` (.keras) quantisation-aware, calibrate it and fine-tune it on
    the training images of ``images`` (a dataset root or a folder of images; default: the run's
    ``data_dir``; ranges: min/max, or the ``calibration_quantile`` of each tensor's values; the
    outputs of ``float_layers`` stay float); write it
    to ``output`` (default ``<model>_qat.keras`` beside it) with a JSON
    report (``<output>.json``). Returns the report. Nothing is written if anything fails."""
    import json

    from mdekd import run_folder
    from mdekd.atomic import atomic_path, prepare_file, write_text_atomically
    from mdekd.export import (DEFAULT_NUM_CALIBRATION, check_images, evenly_spaced, image_files,
                              verification_data)
    from mdekd.predict import load_resized_images
    from mdekd.tflite_runner import load_depth_model

    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"--model: Keras model not found: {model_path}")
    run = run_folder.read_run_config(model_path)
    dataset = dataset or run.get("dataset") or "mai2021"
    images = images or run.get("data_dir")
    if images is None:
        raise ValueError("--images: quantisation-aware fine-tuning needs training images "
                         "(a dataset root with train/rgb, or a folder of images)")
    if steps < 0 or batch_size < 1 or num_images < 1 or not learning_rate > 0:
        raise ValueError("--steps must be >= 0, --batch_size and --num_images >= 1, "
                         "--learning_rate > 0")
    if calibration_quantile is not None and not 0.5 < calibration_quantile < 1:
        raise ValueError(f"--calibration_quantile: expected a value in (0.5, 1), got {calibration_quantile}")
    output = os.fspath(output) if output else os.path.splitext(model_path)[0] + "_qat.keras"
    if not output.endswith(".keras"):
        raise ValueError(f"--output: expected a .keras path, got {output}")
    prepare_file(output, "--output")
    paths = evenly_spaced(image_files(images, dataset), num_images)
    check_images(paths)

    model = load_depth_model(model_path)
    if is_quantization_aware(model):
        raise ValueError(f"--model: {model_path} is already quantisation-aware")
    size = tuple(model.input_shape[1:3])
    train = load_resized_images(paths, size)
    held_out = verification_data(size, validation_data or run.get("data_dir"), dataset).images
    reference = deploy_model(model)
    aware = quantization_aware_model(model, float_layers)
    calibrate(aware, train[evenly_spaced(range(len(train)), DEFAULT_NUM_CALIBRATION)],
              quantile=calibration_quantile)
    before = relative_deviation(aware, reference, held_out)
    log(f"calibrated on {min(len(train), DEFAULT_NUM_CALIBRATION)} images; quantised vs float on "
        f"held-out images: mean {before['mean_relative_diff']:.2%}, p99 {before['p99_relative_diff']:.2%}")
    losses = fine_tune(aware, reference, train, steps, learning_rate, batch_size, seed, progress)
    after = relative_deviation(aware, reference, held_out)
    log(f"after {steps} steps: mean {after['mean_relative_diff']:.2%}, p99 {after['p99_relative_diff']:.2%}")
    report = {
        "source_model": os.path.abspath(model_path), "output": os.path.abspath(output),
        "images": os.fspath(images), "num_images": len(train), "steps": steps,
        "learning_rate": learning_rate, "batch_size": batch_size, "seed": seed,
        "calibration_quantile": calibration_quantile, "float_layers": list(float_layers),
        "loss_first_last": [losses[0], losses[-1]] if losses else None,
        "fake_quant_ranges": len(fake_quant_layers(aware)),
        "held_out_deviation_vs_float": {
            stage: {"mean": errors["mean_relative_diff"], "p99": errors["p99_relative_diff"]}
            for stage, errors in (("calibrated", before), ("fine_tuned", after))},
    }
    with atomic_path(output) as tmp:
        aware.save(tmp)
    write_text_atomically(output + ".json", json.dumps(report, indent=2) + "\n")
    return report


def main(argv):
    from absl import flags

    flags_ = flags.FLAGS
    fine_tune_file(flags_.model, images=flags_.images, output=flags_.output, dataset=flags_.dataset,
                   steps=flags_.steps, learning_rate=flags_.learning_rate, batch_size=flags_.batch_size,
                   num_images=flags_.num_images, validation_data=flags_.validation_data,
                   calibration_quantile=flags_.calibration_quantile,
                   float_layers=flags_.float_layers or (), seed=flags_.seed)


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model", None, "Trained student (.keras).", required=True)
    flags.DEFINE_string("images", None, "Training images: a dataset root with train/rgb or a folder "
                        "of images. Default: the data_dir of the run.json beside the model.")
    flags.DEFINE_string("dataset", None, "Layout of the data folders. Default: the run's, else mai2021.")
    flags.DEFINE_string("output", None, "Output .keras path. Default: <model>_qat.keras beside it.")
    flags.DEFINE_integer("steps", DEFAULT_STEPS, "Fine-tuning steps.")
    flags.DEFINE_float("learning_rate", DEFAULT_LEARNING_RATE, "Adam learning rate.")
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Images per step.")
    flags.DEFINE_integer("num_images", DEFAULT_NUM_IMAGES,
                         "Training images used (spread evenly), held in memory at the model size.")
    flags.DEFINE_string("validation_data", None, "Held-out images for the before/after deviation. "
                        "Default: the run's data_dir (its validation split).")
    flags.DEFINE_float("calibration_quantile", None, "Range of each tensor from this quantile (and 1 − it) "
                       "of its values instead of min/max, e.g. 0.99999.")
    flags.DEFINE_list("float_layers", [], "Layers whose output stays float, e.g. FastDepth's first "
                      "blocks conv1_relu,conv_dw_1_relu,conv_pw_1_relu,conv_dw_2_relu,conv_pw_2_relu.")
    flags.DEFINE_integer("seed", 0, "Seed of the batch order and flips.")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    from mdekd.cli import command

    _define_flags()
    app.run(command("mdekd.quantization_aware")(main))
