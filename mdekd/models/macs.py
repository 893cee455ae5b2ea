"""Parameter and multiply-accumulate counts from a Keras graph's static shapes.

MACs are those of Conv2D (grouped too), DepthwiseConv2D and Dense, per image (batch excluded);
bias additions, BatchNorm, activations, pooling and resizing are not counted (the FastDepth
convention: 0.737 GMACs at 224×224 for the reference student).
"""

import re
from collections import OrderedDict

import keras
import numpy as np

from mdekd.models.common import iter_layers

# MobileNet v1 block index -> output stride of that block (blocks 2, 4, 6, 12 have stride 2)
_MOBILENET_BLOCK_STRIDE = {1: 2, 2: 4, 3: 4, 4: 8, 5: 8, **{i: 16 for i in range(6, 12)}, 12: 32, 13: 32}


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

    Returns an OrderedDict ``stage -> (parameters, macs)``. Stages of a nested encoder are
    ``"<encoder name>/<stage>"``. Encoder stages are ResNeSt's stem, layer1..layer4 and MobileNet's
    stem, stride2..stride32; decoder layers are grouped by the first word of their name
    (``decode1``, ``fuse4``, ``head``). Layers without parameters or MACs are left out.
    """
    costs = OrderedDict()
    for path, layer in _iter_layers_with_path(model):
        params = trainable_parameter_count(layer)
        macs = layer_macs(layer)
        if params == 0 and macs == 0:
            continue
        stage = "/".join((*path, _stage_of(layer.name)))
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


def _iter_layers_with_path(model, path=()):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _iter_layers_with_path(layer, (*path, layer.name))
        else:
            yield path, layer


def _stage_of(layer_name):
    """Stage of a layer: ResNeSt layer1..4 / MobileNet output stride / encoder stem / name prefix."""
    resnest_stage = re.match(r"(layer\d+)_", layer_name)
    if resnest_stage:
        return resnest_stage.group(1)
    mobilenet_block = re.match(r"conv_(?:dw|pw|pad)_(\d+)", layer_name)
    if mobilenet_block:
        return f"stride{_MOBILENET_BLOCK_STRIDE[int(mobilenet_block.group(1))]}"
    if re.match(r"(conv1|bn1|act1|maxpool)(_|$)", layer_name):
        return "stem"
    return layer_name.split("_")[0]

