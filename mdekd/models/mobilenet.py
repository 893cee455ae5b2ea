"""MobileNet v1 encoder of the FastDepth student (Howard et al. 2017; dwofk/fast-depth).

Layer for layer ``keras.applications.MobileNet`` (same names and weights, so its ImageNet files
load), except that stride-2 convolutions pad as the reference's PyTorch MobileNet (padding=1) and
the teacher's ResNeSt do (``STRIDE2_PADDING``, docs/design.md §4). BatchNormalization: momentum 0.9,
Keras' epsilon 1e-3 that the ImageNet weights were trained with.
"""

import os
import socket

import keras

from mdekd.models.common import BATCHNORM_MOMENTUM

# MobileNet v1 depthwise-separable blocks (pointwise filters at α = 1, depthwise stride), as
# keras.applications.mobilenet builds them (conv_dw_1 .. conv_dw_13)
MOBILENET_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                    *((512, 1),) * 5, (1024, 2), (1024, 1))
# output stride -> the layer whose map the decoder reads (fast-depth MobileNetSkipAdd forward;
# stride16 only sets the width of the decoder stage that outputs it)
TAPS = {"stride2": "conv_pw_1_relu", "stride4": "conv_pw_3_relu", "stride8": "conv_pw_5_relu",
        "stride16": "conv_pw_11_relu", "stride32": "conv_pw_13_relu"}

# Zero padding ((top, bottom), (left, right)) before each stride-2 convolution of the encoder;
# unlisted ones pad 1 on every side (the reference's PyTorch padding=1). Keras' MobileNet pads
# (0, 1) everywhere, which puts the student's maps 0.4-1.1 cells off the teacher's; this table,
# measured with mdekd.models.alignment, brings every distilled stride within 0.4 cell of a ResNeSt
# teacher (docs/design.md §4): the teacher's stride-2 map is its upsampled stride-4 stem (conv s2
# + max pool s2, 1.5 px up-left of the pixel grid), so conv1 pads 2 px top/left; its residual
# blocks' average-pool shortcuts do not shift, so conv_dw_4 pads bottom/right like Keras.
STRIDE2_PADDING = {"conv1": ((2, 0), (2, 0)), "conv_dw_4": ((0, 1), (0, 1))}

# keras.applications.mobilenet: where Keras keeps its ImageNet weights and how it names them
MOBILENET_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/"
MOBILENET_ALPHA_TEXT = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}
DOWNLOAD_TIMEOUT_S = 30  # a download without network must fail, not hang


def build_mobilenet_encoder(input_shape, alpha=1.0, weights=None):
    """MobileNet v1 without top: (B, H, W, 3) in [-1, 1] -> dict ``stride2`` .. ``stride32`` maps.

    ``weights``: None (random), "imagenet" (Keras' file, from its cache or downloaded) or a path to
    a MobileNet .h5 / .weights.h5 file.
    """
    image = keras.Input(input_shape, name="mobilenet_input")
    x = keras.layers.ZeroPadding2D(STRIDE2_PADDING["conv1"], name="conv1_pad")(image)
    x = keras.layers.Conv2D(int(32 * alpha), 3, strides=2, use_bias=False, name="conv1")(x)
    x = _bn_relu6(x, "conv1")
    for block, (filters, stride) in enumerate(MOBILENET_BLOCKS, start=1):
        if stride == 2:
            x = keras.layers.ZeroPadding2D(STRIDE2_PADDING.get(f"conv_dw_{block}", 1),
                                           name=f"conv_pad_{block}")(x)
        x = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same" if stride == 1 else "valid",
                                         use_bias=False, name=f"conv_dw_{block}")(x)
        x = _bn_relu6(x, f"conv_dw_{block}")
        x = keras.layers.Conv2D(int(filters * alpha), 1, use_bias=False, name=f"conv_pw_{block}")(x)
        x = _bn_relu6(x, f"conv_pw_{block}")
    mobilenet = keras.Model(image, x, name="mobilenet")
    if weights is not None:
        mobilenet.load_weights(_weights_path(weights, alpha))
    return keras.Model(mobilenet.input, {key: mobilenet.get_layer(tap).output for key, tap in TAPS.items()},
                       name="encoder")


def _bn_relu6(x, prefix):
    x = keras.layers.BatchNormalization(momentum=BATCHNORM_MOMENTUM, name=f"{prefix}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{prefix}_relu")(x)


def _weights_path(weights, alpha):
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
