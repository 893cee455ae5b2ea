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

from mdekd.models.common import inference_model
from mdekd.models.layers import UpsampleBilinearAlignCorners, UpsampleNearest

UPSAMPLING_LAYERS = (keras.layers.UpSampling2D, UpsampleNearest, UpsampleBilinearAlignCorners)
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
