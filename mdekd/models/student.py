"""Student: FastDepth (Wofk et al. 2019), MobileNet v1 encoder + NNConv5 decoder with additive skips.

Reference: dwofk/fast-depth ``MobileNetSkipAdd`` (design.md §4). Decoder stage i is
[DepthwiseConv 5×5 + BN + ReLU, Conv 1×1 + BN + ReLU, ×2 upsampling]; skips are added after the
upsampling. The head is the reference's Conv 1×1 (no bias) + BN, followed by ``softplus + MIN_DEPTH``
instead of its ReLU, so depth is > 0 and the parameter count is the reference's exactly
(3,960,930 at α = 1: 3,206,976 encoder + 753,954 decoder; the activation has no parameters).
Every BatchNormalization uses momentum 0.9 (design.md §4); the decoder's use PyTorch's epsilon 1e-5 as
the reference does, MobileNet's keep Keras' 1e-3 that its ImageNet weights were trained with.

Upsampling: ``"nearest"`` is the reference's choice, built as ``UpsampleNearest`` (TFLite
``RESIZE_NEAREST_NEIGHBOR``; Keras' nearest ``UpSampling2D`` lowers to a TILE chain that splits
XNNPACK, toolchain.md §5); ``"bilinear"`` (Keras ``UpSampling2D``, ``RESIZE_BILINEAR``) is the
default the ablations were run with.
"""

import os
import socket

import keras

from mdekd.models.common import BATCHNORM_MOMENTUM, FEATURE_KEYS, batchnorm_layer, check_input_shape
from mdekd.models.layers import ExpDepth, PositiveDepth, UpsampleNearest

DECODER_WIDTHS = (512, 256, 128, 64, 32)  # design.md §4, fast-depth decode_conv1..5 at α = 1
DECODER_KERNEL_SIZE = 5  # fast-depth MobileNetSkipAdd kernel_size
ENCODER_OUTPUT = "conv_pw_13_relu"  # (B, H/32, W/32, 1024·α)
# decoder stage -> MobileNet layer added after that stage's upsampling (fast-depth forward)
SKIP_TAPS = {2: "conv_pw_5_relu", 3: "conv_pw_3_relu", 4: "conv_pw_1_relu"}
# decoder stage -> output key of its (post-skip) map
STAGE_OUTPUTS = dict(enumerate(FEATURE_KEYS, start=1))
UPSAMPLING_MODES = ("nearest", "bilinear")
# depth_output -> activation after the head: "softplus" (depth ≈ the head's value, the reference's
# ReLU made > 0) or "log" (the head predicts log depth, so int8 errs by a fraction of the depth,
# docs/design.md §5)
DEPTH_OUTPUTS = {"softplus": PositiveDepth, "log": ExpDepth}
# MobileNet v1 depthwise-separable blocks (pointwise filters at α = 1, depthwise stride), as
# keras.applications.mobilenet builds them (conv_dw_1 .. conv_dw_13)
MOBILENET_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                    *((512, 1),) * 5, (1024, 2), (1024, 1))

# keras.applications.mobilenet: where Keras keeps its ImageNet weights and how it names them
MOBILENET_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/"
MOBILENET_ALPHA_TEXT = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}
DOWNLOAD_TIMEOUT_S = 30  # a download without network must fail, not hang


# Zero padding ((top, bottom), (left, right)) before each stride-2 convolution of the encoder;
# unlisted ones pad 1 on every side (the reference's PyTorch padding=1). Keras' MobileNet pads
# (0, 1) everywhere, which puts the student's maps 0.4-1.1 cells off the teacher's; this table,
# measured with mdekd.models.alignment, brings every distilled stride within 0.4 cell of a ResNeSt
# teacher (docs/design.md §4): the teacher's stride-2 map is its upsampled stride-4 stem (conv s2
# + max pool s2, 1.5 px up-left of the pixel grid), so conv1 pads 2 px top/left; its residual
# blocks' average-pool shortcuts do not shift, so conv_dw_4 pads bottom/right like Keras.
STRIDE2_PADDING = {"conv1": ((2, 0), (2, 0)), "conv_dw_4": ((0, 1), (0, 1))}


def build_student(input_shape=(480, 640, 3), encoder_weights=None, upsampling="bilinear", alpha=1.0,
                  depth_output="softplus", name="fastdepth"):
    """Build FastDepth for a fixed input size.

    Args:
      input_shape: (H, W, 3), H and W multiples of 32.
      encoder_weights: None (random), "imagenet" (Keras' MobileNet weights, from the Keras cache
        or downloaded) or a path to a MobileNet weights file (.h5 or .weights.h5).
      upsampling: "bilinear" (default) or "nearest" (the reference's).
      alpha: MobileNet width multiplier; decoder widths scale with it (small α for tests).
      depth_output: a key of ``DEPTH_OUTPUTS``, the head's activation ("softplus" or "log").
    Returns:
      keras.Model: image (B, H, W, 3) RGB float32 in [0, 1] -> dict ``depth`` (B, H, W, 1) metres > 0,
      ``stride16`` .. ``stride2`` decoder maps (B, H/s, W/s, C).
    """
    input_shape = check_input_shape(input_shape)
    if upsampling not in UPSAMPLING_MODES:
        raise ValueError(f"upsampling must be one of {UPSAMPLING_MODES}, got {upsampling!r}")
    if depth_output not in DEPTH_OUTPUTS:
        raise ValueError(f"depth_output must be one of {tuple(DEPTH_OUTPUTS)}, got {depth_output!r}")
    encoder = _build_encoder(input_shape, alpha, encoder_weights)

    image = keras.Input(input_shape, name="image")
    # MobileNet expects [-1, 1] (keras.applications.mobilenet.preprocess_input)
    normalised = keras.layers.Rescaling(2.0, offset=-1.0, name="mobilenet_normalization")(image)
    features = encoder(normalised)

    x = features[ENCODER_OUTPUT]
    outputs = {}
    for stage, width in enumerate(DECODER_WIDTHS, start=1):
        x = _nnconv5_stage(x, int(width * alpha), f"decode{stage}", upsampling)
        if stage in SKIP_TAPS:
            x = keras.layers.Add(name=f"decode{stage}_skip")([x, features[SKIP_TAPS[stage]]])
        if stage in STAGE_OUTPUTS:
            outputs[STAGE_OUTPUTS[stage]] = x
    x = keras.layers.Conv2D(1, 1, use_bias=False, name="head_conv")(x)
    x = batchnorm_layer("head_bn")(x)
    depth = DEPTH_OUTPUTS[depth_output](name="depth")(x)
    return keras.Model(image, {"depth": depth, **outputs}, name=name)


def _nnconv5_stage(x, width, prefix, upsampling):
    """DepthwiseConv 5×5 + BN + ReLU, Conv 1×1 + BN + ReLU, ×2 upsampling (no biases)."""
    x = keras.layers.DepthwiseConv2D(DECODER_KERNEL_SIZE, padding="same", use_bias=False, name=f"{prefix}_dw")(x)
    x = batchnorm_layer(f"{prefix}_dw_bn")(x)
    x = keras.layers.ReLU(name=f"{prefix}_dw_relu")(x)
    x = keras.layers.Conv2D(width, 1, use_bias=False, name=f"{prefix}_pw")(x)
    x = batchnorm_layer(f"{prefix}_pw_bn")(x)
    x = keras.layers.ReLU(name=f"{prefix}_pw_relu")(x)
    if upsampling == "nearest":
        return UpsampleNearest(2, name=f"{prefix}_up")(x)
    return keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"{prefix}_up")(x)


def _build_encoder(input_shape, alpha, weights):
    """MobileNet v1 without top as a model with the decoder's taps as outputs.

    Layer for layer ``keras.applications.MobileNet`` (same names and weights, so its ImageNet files
    load), except that every stride-2 convolution pads one pixel on **all** sides, as the reference's
    PyTorch MobileNet (padding=1) and the teacher's ResNeSt do; Keras pads the bottom/right only,
    which shifts every cell by half an input pixel per stride-2 layer the other way and leaves the
    student's maps about a cell off the teacher's (docs/design.md §4, tests/test_alignment.py).
    BatchNormalization: momentum 0.9, Keras' epsilon 1e-3 that the ImageNet weights were trained with.
    """
    image = keras.Input(input_shape, name="mobilenet_input")
    x = keras.layers.ZeroPadding2D(STRIDE2_PADDING["conv1"], name="conv1_pad")(image)
    x = keras.layers.Conv2D(int(32 * alpha), 3, strides=2, use_bias=False, name="conv1")(x)
    x = _mobilenet_bn_relu(x, "conv1")
    for block, (filters, stride) in enumerate(MOBILENET_BLOCKS, start=1):
        if stride == 2:
            x = keras.layers.ZeroPadding2D(STRIDE2_PADDING.get(f"conv_dw_{block}", 1),
                                           name=f"conv_pad_{block}")(x)
        x = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same" if stride == 1 else "valid",
                                         use_bias=False, name=f"conv_dw_{block}")(x)
        x = _mobilenet_bn_relu(x, f"conv_dw_{block}")
        x = keras.layers.Conv2D(int(filters * alpha), 1, use_bias=False, name=f"conv_pw_{block}")(x)
        x = _mobilenet_bn_relu(x, f"conv_pw_{block}")
    mobilenet = keras.Model(image, x, name="mobilenet")
    if weights is not None:
        mobilenet.load_weights(_encoder_weights_path(weights, alpha))
    taps = (ENCODER_OUTPUT, *SKIP_TAPS.values())
    return keras.Model(mobilenet.input, {tap: mobilenet.get_layer(tap).output for tap in taps}, name="encoder")


def _mobilenet_bn_relu(x, prefix):
    x = keras.layers.BatchNormalization(momentum=BATCHNORM_MOMENTUM, name=f"{prefix}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{prefix}_relu")(x)


def _encoder_weights_path(weights, alpha):
    if weights == "imagenet":
        return imagenet_mobilenet_weights(alpha)
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder_weights file {path!r} not found (expected a MobileNet .h5 or .weights.h5)")
    return path


def imagenet_mobilenet_weights(alpha=1.0):
    """Path of Keras' ImageNet MobileNet v1 weights without top (224×224 training size).

    Uses the Keras cache (``$KERAS_HOME/models`` or ``~/.keras/models``) when the file is there;
    otherwise downloads it. Raises FileNotFoundError naming the file and where to put it when the
    download fails (no network).
    """
    alpha = float(alpha)
    if alpha not in MOBILENET_ALPHA_TEXT:
        raise ValueError(f"ImageNet MobileNet weights exist for alpha in {sorted(MOBILENET_ALPHA_TEXT)}, got {alpha}")
    file_name = f"mobilenet_{MOBILENET_ALPHA_TEXT[alpha]}_224_tf_no_top.h5"
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    cached = os.path.join(keras_home, "models", file_name)
    if os.path.isfile(cached):
        return cached
    url = MOBILENET_WEIGHTS_URL + file_name
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return keras.utils.get_file(file_name, url, cache_subdir="models")
    except Exception as error:  # any failure (no network, HTTP error, timeout) has the same remedy
        raise FileNotFoundError(
            f"ImageNet MobileNet weights {file_name} are not cached and could not be downloaded from {url} "
            f"({type(error).__name__}: {error}). Download that file on a machine with network access and put "
            f"it at {cached}, or pass encoder_weights=<path to the file>."
        ) from error
    finally:
        socket.setdefaulttimeout(previous_timeout)
