"""Conventions both depth models share: input size rule, BatchNorm momentum, the depth-only graph."""

import keras

BATCHNORM_MOMENTUM = 0.9  # SPEC §4: PyTorch momentum 0.1 of the reference nets (TOOLCHAIN §16)
TORCH_BATCHNORM_EPSILON = 1e-5  # PyTorch's BatchNorm2d default, used by all reference decoders
OUTPUT_STRIDE = 32  # both encoders downsample by 32, so H and W must be multiples of it (SPEC §4)
FEATURE_KEYS = ("stride16", "stride8", "stride4", "stride2")  # decoder maps, SPEC §4


def check_input_shape(input_shape):
    """Validate a fixed (H, W, 3) input shape; H and W must be multiples of 32.

    The models are built for one input size: Keras 3.15.1 cannot trace bilinear ``UpSampling2D``
    with unknown H/W (TOOLCHAIN §1), and the decoders add maps of matching sizes.
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
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)
        else:
            yield layer


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
