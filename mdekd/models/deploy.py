"""The deployed graph: the depth-only network rewritten into a cheaper, mathematically equal form.

Exact rewrite (docs/design.md §5): the student's head, Conv 1×1 + BatchNormalization, is affine
per pixel, and ×2 nearest or bilinear upsampling is a per-channel weighted average whose weights
sum to 1, so the two commute: ``head(up(x)) == up(head(x))``. Running the head *before* the last
upsampling computes it on a quarter of the pixels and upsamples 1 channel instead of 32·α at full
resolution; only the positive-depth activation, which does not commute, stays after it.
``deploy_model`` applies the rewrite to a copy with the trained weights; export converts that graph
and verifies it against the training graph.
"""

import keras

from mdekd.models.attention import DualAttention, MultiHeadSelfAttention
from mdekd.models.common import check_input_shape, inference_model, iter_layers
from mdekd.models.layers import UpsampleBilinearAlignCorners, UpsampleNearest

UPSAMPLING_LAYERS = (keras.layers.UpSampling2D, UpsampleNearest, UpsampleBilinearAlignCorners)
# Layers whose int8 form is slower than float on CPU: TFLite's int8 BATCH_MATMUL does not run in
# XNNPACK (one MobileViT attention at 4×1200 tokens: 387 ms int8, 41 ms fp32; docs/toolchain.md §23).
FLOAT_UNDER_INT8 = (MultiHeadSelfAttention, DualAttention)
HEAD_LAYERS = ("head_conv", "head_bn")  # per-pixel affine layers between the last upsampling and ``depth``


def deploy_model(model):
    """The depth-only graph of ``model`` with the head moved before the last upsampling when the
    model ends ``upsampling -> head_conv (1×1) -> head_bn -> depth``; else ``inference_model``.

    (B, H, W, 3) RGB in [0, 1] -> (B, H, W, 1) metres, equal to the training graph's ``depth`` up to
    float rounding. The weights are copied: the returned model shares no variables with ``model``.
    """
    names = {layer.name for layer in model.layers}
    if not set(HEAD_LAYERS) <= names or "depth" not in names:
        return inference_model(model)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    conv, batchnorm, activation = (copy.get_layer(name) for name in (*HEAD_LAYERS, "depth"))
    upsample = conv.input._keras_history.operation
    if (not isinstance(upsample, UPSAMPLING_LAYERS) or tuple(conv.kernel_size) != (1, 1)
            or conv.strides != (1, 1) or activation.input._keras_history.operation is not batchnorm):
        return inference_model(model)
    features = upsample.input
    x = batchnorm(conv(features))
    # The tail gets layers of its own (both weightless), so walking the deployed graph back from
    # its output (``output_tail``) never meets a node of the training graph.
    late_upsample = upsample.__class__.from_config({**upsample.get_config(), "name": f"{upsample.name}_deploy"})
    depth = activation.__class__.from_config(activation.get_config())(late_upsample(x))
    return keras.Model(copy.inputs, depth, name=f"{model.name}_deploy")


def output_tail(model):
    """Names of the weightless layers that end ``model`` on single-channel maps: walking back from
    the output while a layer has no weights and one 1-channel input (the late upsampling and the
    depth activation of a deployed student). Export keeps them in float under int8, so the last
    quantised tensor is the head's own output: log depth for ``depth_output="log"``."""
    names = []
    layer = model.output._keras_history.operation
    while not layer.weights:
        inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        if len(inputs) != 1 or inputs[0].shape[-1] != 1:
            break
        names.append(layer.name)
        layer = inputs[0]._keras_history.operation
    return names[::-1]


def float_under_int8(model):
    """Names of the layers (nested ones included) of a ``FLOAT_UNDER_INT8`` class: export keeps
    them in float, between a DEQUANTIZE and a QUANTIZE, when it quantises ``model`` to int8."""
    return [layer.name for layer in iter_layers(model) if isinstance(layer, FLOAT_UNDER_INT8)]


def at_input_size(model, input_size):
    """``model`` (fully convolutional, fixed input) rebuilt for ``input_size`` (H, W) with the same
    weights: every InputLayer's shape in its config is replaced, so nested encoders follow."""
    height, width = (int(n) for n in input_size)

    def resize_inputs(config):
        if isinstance(config, dict):
            if config.get("class_name") == "InputLayer":
                shape = list(config["config"]["batch_shape"])
                config["config"]["batch_shape"] = [shape[0], height, width, *shape[3:]]
            for value in config.values():
                resize_inputs(value)
        elif isinstance(config, list):
            for value in config:
                resize_inputs(value)
        return config

    config = resize_inputs(keras.saving.serialize_keras_object(model))
    rebuilt = keras.saving.deserialize_keras_object(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def reduced_resolution_model(model, input_size):
    """The deployed graph that runs ``model`` at the smaller ``input_size`` (H, W) inside the
    model's own input and output size: full-size RGB -> bilinear resize to ``input_size`` ->
    ``deploy_model`` at that size -> depth resized (bilinear) back to the full size.

    (B, H, W, 3) -> (B, H, W, 1) metres. Raises ValueError for a size that is not a multiple of 32
    (``check_input_shape``) or is larger than the model's.
    """
    full = tuple(model.input_shape[1:3])
    size = tuple(int(n) for n in input_size)
    try:
        check_input_shape((*size, 3))
    except ValueError as error:
        raise ValueError(f"--input_size: {error}") from None
    if size[0] > full[0] or size[1] > full[1]:
        raise ValueError(f"--input_size: {size[0]}x{size[1]} is larger than the model's input "
                         f"{full[0]}x{full[1]}; a reduced-resolution export must be smaller")
    if size == full:
        return deploy_model(model)
    small = deploy_model(at_input_size(model, size))
    image = keras.Input((*full, 3), name="image")
    x = keras.layers.Resizing(*size, interpolation="bilinear", name="resize_to_network")(image)
    depth = keras.layers.Resizing(*full, interpolation="bilinear", name="resize_to_input")(small(x))
    return keras.Model(image, depth, name=f"{model.name}_{size[0]}x{size[1]}")
