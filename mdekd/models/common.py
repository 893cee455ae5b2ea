"""Conventions both depth models share: input size rule, BatchNorm momentum, the depth-only graph."""

import keras

BATCHNORM_MOMENTUM = 0.9  # design.md §4: PyTorch momentum 0.1 of the reference nets (toolchain.md §16)
TORCH_BATCHNORM_EPSILON = 1e-5  # PyTorch's BatchNorm2d default, used by all reference decoders
OUTPUT_STRIDE = 32  # both encoders downsample by 32, so H and W must be multiples of it (design.md §4)
FEATURE_KEYS = ("stride16", "stride8", "stride4", "stride2")  # decoder maps, design.md §4


def check_input_shape(input_shape):
    """Validate a fixed (H, W, 3) input shape; H and W must be multiples of 32.

    The models are built for one input size: Keras 3.15.1 cannot trace bilinear ``UpSampling2D``
    with unknown H/W (toolchain.md §1), and the decoders add maps of matching sizes.
    """
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (H, W, 3), got {tuple(input_shape)}")
    height, width = input_shape[0], input_shape[1]
    if height is None or width is None or height % OUTPUT_STRIDE or width % OUTPUT_STRIDE:
        raise ValueError(
            f"input height and width must be multiples of {OUTPUT_STRIDE} (the encoder's output stride), "
            f"got {height}x{width}"
        )
    return tuple(int(n) for n in input_shape)


def iter_layers(model):
    """Yield every leaf layer of ``model``, descending into nested models."""
    for _, layer in iter_layers_with_path(model):
        yield layer


def iter_layers_with_path(model, path=()):
    """Yield ``(path, layer)`` for every leaf layer; ``path`` names the nested models it sits in."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from iter_layers_with_path(layer, (*path, layer.name))
        else:
            yield path, layer


def batchnorm_layer(name, epsilon=TORCH_BATCHNORM_EPSILON):
    """A BatchNormalization with the reference nets' momentum and epsilon."""
    return keras.layers.BatchNormalization(momentum=BATCHNORM_MOMENTUM, epsilon=epsilon, name=name)


def inference_model(model):
    """The depth-only graph of a student or teacher, sharing its weights.

    (B, H, W, 3) RGB in [0, 1] -> (B, H, W, 1) depth in metres; used for export and predict.
    """
    outputs = model.output
    if isinstance(outputs, dict):
        if "depth" not in outputs:
            raise ValueError(f"model {model.name!r} has no 'depth' output; outputs are {sorted(outputs)}")
        depth = outputs["depth"]
    else:
        depth = model.get_layer("depth").output
    return keras.Model(model.inputs, depth, name=f"{model.name}_depth")


def set_depth_prior(network, median_depth):
    """Start a network whose depth head ends in BatchNormalization at ``median_depth`` metres.

    Such a head (the student's Conv 1×1 + BN → depth activation) outputs ≈ activation(β) at
    initialisation, whatever the features; its global scale can then only move with β, which Adam
    shifts by about one learning rate per step, so a short run never reaches metres (measured: a
    800-step student stayed 5× too near). Setting β = activation⁻¹(median_depth) starts it at the
    training data's scale (docs/design.md §1, metric depth). Returns True when it applied; heads
    ending in a biased convolution (the teacher's) learn their scale and are left alone.
    """
    activation = network.get_layer("depth")
    head = activation.input._keras_history.operation
    if not isinstance(head, keras.layers.BatchNormalization) or not hasattr(activation, "inverse"):
        return False
    head.beta.assign(keras.ops.full(head.beta.shape, activation.inverse(median_depth)))
    return True
