"""Parameter and multiply-accumulate counts from a Keras graph's static shapes.

MACs are those of Conv2D (grouped too), DepthwiseConv2D, Dense and of layers that report their own
(``multiply_accumulates()``: the attention layers' matrix products), per image (batch excluded);
bias additions, BatchNorm, activations, pooling and resizing are not counted (the FastDepth
convention: 0.737 GMACs at 224×224 for the reference student).
"""

from collections import OrderedDict

import keras
import numpy as np

from mdekd.models.common import iter_layers, iter_layers_with_path


def trainable_parameter_count(model):
    """Parameters in the PyTorch sense: kernels, biases, BN γ/β; BN moving statistics excluded.

    Counts weights that are trainable by nature, whatever the model's current ``trainable`` flag,
    so a frozen teacher still reports its size (Keras marks every variable of a frozen layer
    non-trainable, so the flag cannot tell BN statistics from γ/β).
    """
    layers = iter_layers(model) if isinstance(model, keras.Model) else [model]
    return int(sum(np.prod(w.shape) for layer in layers for w in _parameters(layer)))


def _parameters(layer):
    if isinstance(layer, keras.layers.BatchNormalization):
        return [w for w in (layer.gamma, layer.beta) if w is not None]
    return layer.weights


def layer_macs(layer):
    """Multiply-accumulates of one layer for one image, from its static output shape."""
    if hasattr(layer, "multiply_accumulates"):
        return int(layer.multiply_accumulates())
    if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
        return 0
    output_shape = tuple(layer.output.shape[1:])
    if any(n is None for n in output_shape):
        raise ValueError(
            f"layer {layer.name!r} has output shape {output_shape} with unknown sizes; "
            "build the model for a fixed input size to count MACs"
        )
    positions = int(np.prod(output_shape[:-1]))
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel_h, kernel_w = layer.kernel_size
        return positions * kernel_h * kernel_w * output_shape[-1]
    if isinstance(layer, keras.layers.Conv2D):
        kernel_h, kernel_w, inputs_per_group, _ = layer.kernel.shape
        return positions * kernel_h * kernel_w * inputs_per_group * output_shape[-1]
    return positions * layer.kernel.shape[0] * output_shape[-1]


def count_macs(model):
    """Multiply-accumulates of one forward pass for one image, nested models included."""
    return int(sum(layer_macs(layer) for layer in iter_layers(model)))


def cost_breakdown(model):
    """Trainable parameters and MACs per stage, in graph order.

    Returns an OrderedDict ``stage -> (parameters, macs)``. A stage is the output stride of its
    layers (``stride2`` .. ``stride32``, input height / output height; ``stride1`` at full
    resolution), prefixed by the nested models a layer sits in (``encoder/stride8``), so every
    network built from Keras layers is broken down alike, whatever its layer names. Layers without
    parameters or MACs are left out.
    """
    input_size = tuple(model.input_shape[1:3])
    costs = OrderedDict()
    stride = "stride1"
    for path, layer in iter_layers_with_path(model):
        # Layers on a globally pooled 1×1 map (split / channel attention) belong to the block
        # they gate, i.e. to the stride of the last spatial layer before them.
        stride = _stage_of(layer, input_size, previous=stride)
        params = trainable_parameter_count(layer)
        macs = layer_macs(layer)
        if params == 0 and macs == 0:
            continue
        stage = "/".join((*path, stride))
        old_params, old_macs = costs.get(stage, (0, 0))
        costs[stage] = (old_params + params, old_macs + macs)
    return costs


def cost_table(model):
    """Text table of ``cost_breakdown``: stage, trainable parameters, GMACs, then the totals."""
    rows = [(stage, params, macs) for stage, (params, macs) in cost_breakdown(model).items()]
    width = max(len("total"), *(len(stage) for stage, _, _ in rows))
    lines = [f"{'stage':<{width}}  {'parameters':>12}  {'GMACs':>9}"]
    lines += [f"{stage:<{width}}  {params:>12,}  {macs / 1e9:>9.3f}" for stage, params, macs in rows]
    lines.append(f"{'total':<{width}}  {trainable_parameter_count(model):>12,}  {count_macs(model) / 1e9:>9.3f}")
    return "\n".join(lines)


def _stage_of(layer, input_size, previous):
    """``stride<s>`` of a layer's (first) 4-D output; ``previous`` for a 1×1 (pooled) map or a
    non-spatial output (Dense on tokens, MobileViT's (B, P, N, d) patches: their height and width
    ratios to the input disagree)."""
    output = layer.output[0] if isinstance(layer.output, (list, tuple)) else layer.output
    if len(output.shape) != 4 or not all(output.shape[1:3]) or not all(input_size):
        return previous
    if output.shape[1] == 1 < input_size[0]:
        return previous
    strides = {max(int(round(size / n)), 1) for size, n in zip(input_size, output.shape[1:3])}
    return f"stride{strides.pop()}" if len(strides) == 1 else previous
