"""Load timm ResNeSt weights (safetensors, PyTorch layout) into ``build_resnest`` encoders.

Every tensor maps by name: the Keras layer of timm key ``<module path>.<param>`` is the module path
with '.' replaced by '_'. Conv weights (O, I/groups, kh, kw) become kernels (kh, kw, I/groups, O);
BatchNorm weight, bias, running_mean, running_var become gamma, beta, moving_mean,
moving_variance. The classifier ``fc.*`` and ``*.num_batches_tracked`` counters are ignored.
Any missing, unexpected or wrongly shaped tensor is an error, before anything is assigned.
"""

import os

import keras
import numpy as np

from mdekd.models.common import iter_layers

BATCHNORM_KEYS = ("weight", "bias", "running_mean", "running_var")  # order of Keras' BN weights


def load_timm_resnest_weights(encoder, path):
    """Assign the tensors of a timm ResNeSt ``.safetensors`` file to ``encoder`` (in place).

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it is not a readable
    safetensors file or if its tensors do not match the encoder one to one (the message names
    the first missing / unexpected tensor, or the first tensor of the wrong shape with both shapes).
    """
    tensors = _read_safetensors(path)
    tensors = {key: value for key, value in tensors.items() if not _is_ignored(key)}
    targets = _expected_tensors(encoder)  # timm key -> (variable, torch shape, to_keras)

    missing = [key for key in targets if key not in tensors]
    unexpected = sorted(key for key in tensors if key not in targets)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (first: {missing[0]!r})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]!r})")
        raise ValueError(
            f"{path}: tensors do not match encoder {encoder.name!r}: {', '.join(problems)}; "
            "is the file for another ResNeSt variant?"
        )
    for key, (variable, torch_shape, _) in targets.items():
        if tuple(tensors[key].shape) != torch_shape:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                f"encoder {encoder.name!r} expects {torch_shape}"
            )
    for key, (variable, _, to_keras) in targets.items():
        variable.assign(to_keras(tensors[key].astype(np.float32)))


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"timm weights file {path!r} not found (expected a .safetensors state_dict)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path!r} is not a readable safetensors file: {error}") from error


def _is_ignored(key):
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")


def _expected_tensors(encoder):
    """timm key -> (Keras variable, expected torch shape, numpy conversion), in graph order."""
    targets = {}
    for layer in iter_layers(encoder):
        module = layer.name.replace("_", ".")
        if isinstance(layer, keras.layers.Conv2D):
            kernel_h, kernel_w, inputs_per_group, outputs = layer.kernel.shape
            targets[f"{module}.weight"] = (
                layer.kernel,
                (outputs, inputs_per_group, kernel_h, kernel_w),
                lambda w: w.transpose(2, 3, 1, 0),
            )
            if layer.use_bias:
                targets[f"{module}.bias"] = (layer.bias, (outputs,), lambda b: b)
        elif isinstance(layer, keras.layers.BatchNormalization):
            variables = (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
            for param, variable in zip(BATCHNORM_KEYS, variables):
                targets[f"{module}.{param}"] = (variable, tuple(variable.shape), lambda v: v)
        elif layer.weights:
            raise ValueError(f"encoder layer {layer.name!r} ({type(layer).__name__}) has weights with no timm mapping")
    return targets
