"""Teacher: ResNeSt encoder + the feature-fusion decoder of Xian et al. 2018/2019 (design.md §4).

Decoder (the authors' code; dc = ``decoder_channels``, 256 in the reference):
  FTB(x) = ReLU(c + conv3×3(ReLU(BN(conv3×3(ReLU(c)))))) with c = conv3×3(x), convs with bias;
  C5 -> FTB(2·dc) -> conv3×3 (dc) -> ×2                      = stride16
  C_i, i = 4, 3, 2: FTB(C_i -> dc) + top-down -> FTB(dc) -> ×2 = stride8, stride4, stride2
  adaptive output: conv3×3 (dc/2) + BN + ReLU -> conv3×3 (1) -> ×2 -> softplus + MIN_DEPTH.
Every ×2 is bilinear with align_corners=True (PyTorch ``nn.Upsample``). The positive activation
is the student's and has no parameters, so the size is the reference's exactly: 74,844,513 for
ResNeSt-101 (46,226,016 encoder + 28,618,497 decoder).
"""

import os

import keras

from mdekd.models.common import batchnorm_layer, check_input_shape
from mdekd.models.layers import PositiveDepth, UpsampleBilinearAlignCorners
from mdekd.models.resnest import build_resnest
from mdekd.models.timm_weights import load_timm_resnest_weights

# torchvision/timm ImageNet statistics of the ResNeSt weights, for RGB in [0, 1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# top-down fusion: encoder level -> output key of the fused map after its ×2 upsampling
FUSION_LEVELS = (("c4", "stride8"), ("c3", "stride4"), ("c2", "stride2"))


def build_teacher(input_shape=(480, 640, 3), encoder="resnest101", encoder_weights=None, decoder_channels=256, name="teacher"):
    """Build the teacher for a fixed input size.

    Args:
      input_shape: (H, W, 3), H and W multiples of 32.
      encoder: a ResNeSt variant (``mdekd.models.resnest.RESNEST_VARIANTS``).
      encoder_weights: None (random), a timm ``.safetensors`` state_dict, or a Keras
        ``.weights.h5`` written by ``python -m mdekd.models.convert_resnest``.
      decoder_channels: dc above (256 in the reference; small values for tests).
    Returns:
      keras.Model: image (B, H, W, 3) RGB float32 in [0, 1] -> dict ``depth`` (B, H, W, 1) metres > 0,
      ``stride16`` (B, H/16, W/16, dc), ``stride8``, ``stride4``, ``stride2`` (dc channels each).
    """
    input_shape = check_input_shape(input_shape)
    dc = int(decoder_channels)
    if dc < 2:
        raise ValueError(f"decoder_channels must be >= 2, got {decoder_channels}")
    backbone = build_resnest(encoder, input_shape=input_shape, name="encoder")
    if encoder_weights is not None:
        load_encoder_weights(backbone, encoder_weights)

    image = keras.Input(input_shape, name="image")
    scale = [1.0 / s for s in IMAGENET_STD]
    offset = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    normalised = keras.layers.Rescaling(scale, offset=offset, name="imagenet_normalization")(image)
    features = backbone(normalised)

    x = feature_transfer_block(features["c5"], 2 * dc, "fuse5_ftb")
    x = keras.layers.Conv2D(dc, 3, padding="same", name="fuse5_conv")(x)
    x = UpsampleBilinearAlignCorners(2, name="fuse5_up")(x)
    outputs = {"stride16": x}
    for level, key in FUSION_LEVELS:
        prefix = f"fuse{level[1]}"
        lateral = feature_transfer_block(features[level], dc, f"{prefix}_ftb1")
        x = keras.layers.Add(name=f"{prefix}_add")([lateral, x])
        x = feature_transfer_block(x, dc, f"{prefix}_ftb2")
        x = UpsampleBilinearAlignCorners(2, name=f"{prefix}_up")(x)
        outputs[key] = x

    x = keras.layers.Conv2D(dc // 2, 3, padding="same", name="head_conv1")(x)
    x = batchnorm_layer("head_bn")(x)
    x = keras.layers.ReLU(name="head_relu")(x)
    x = keras.layers.Conv2D(1, 3, padding="same", name="head_conv2")(x)
    x = UpsampleBilinearAlignCorners(2, name="head_up")(x)
    depth = PositiveDepth(name="depth")(x)
    return keras.Model(image, {"depth": depth, **outputs}, name=name)


def feature_transfer_block(x, channels, prefix):
    """FTB: (B, H, W, C_in) -> (B, H, W, channels); ReLU(c + conv(ReLU(BN(conv(ReLU(c)))))), c = conv(x)."""
    c = keras.layers.Conv2D(channels, 3, padding="same", name=f"{prefix}_conv1")(x)
    y = keras.layers.ReLU(name=f"{prefix}_branch_relu1")(c)
    y = keras.layers.Conv2D(channels, 3, padding="same", name=f"{prefix}_branch_conv1")(y)
    y = batchnorm_layer(f"{prefix}_branch_bn")(y)
    y = keras.layers.ReLU(name=f"{prefix}_branch_relu2")(y)
    y = keras.layers.Conv2D(channels, 3, padding="same", name=f"{prefix}_branch_conv2")(y)
    y = keras.layers.Add(name=f"{prefix}_add")([c, y])
    return keras.layers.ReLU(name=f"{prefix}_relu")(y)


def load_encoder_weights(encoder, path):
    """Load ResNeSt weights from a timm ``.safetensors`` file or a converted Keras ``.weights.h5``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder_weights file {path!r} not found (expected .safetensors or .weights.h5)")
    if path.endswith(".safetensors"):
        load_timm_resnest_weights(encoder, path)
    elif path.endswith(".weights.h5"):
        encoder.load_weights(path)
    else:
        raise ValueError(f"encoder_weights {path!r}: expected a .safetensors or .weights.h5 file")
