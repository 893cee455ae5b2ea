"""MobileViT encoders (Mehta & Rastegari 2021, apple/ml-cvnets) for the attention students.

A stem, MobileNetV2 inverted residuals and MobileViT blocks: local 3×3 + 1×1 convolutions, unfold
into 2×2 patches, a stack of transformers attending across patches, fold back, 1×1 projection and
a 3×3 fusion with the block's input. The channel table is the paper's (Table 4 / ml-cvnets
``mobilevit.py``); SiLU, BatchNorm with PyTorch's momentum/epsilon, LayerNorm epsilon 1e-5,
stride-2 convolutions padded 1 px on every side as PyTorch does (docs/design.md §7).

Maps whose size is not a multiple of the patch (the stride-32 map of a 480×640 input is 15×20) are
resized bilinearly to the next multiple before unfolding and back after folding, as ml-cvnets does.
Weights: random (offline), or a ``.weights.h5`` file of this encoder (``encoder_weights``).
"""

import dataclasses
import math
import os

import keras
import tensorflow as tf
from keras import ops

from mdekd.models.attention import MultiHeadSelfAttention
from mdekd.models.common import batchnorm_layer

LAYERNORM_EPSILON = 1e-5  # PyTorch nn.LayerNorm default (ml-cvnets)
NUM_HEADS = 4  # ml-cvnets MobileViT v1 default
PATCH_SIZE = 2
LAST_EXPANSION = 4  # conv_1x1_exp widens the last stage 4× (capped at 960)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage at α = 1: output channels, MobileNetV2 blocks (the first has ``stride``), and for a
    MobileViT stage the transformer width, FFN width and number of transformers."""

    channels: int
    stride: int
    mv2_blocks: int = 1
    transformer_dim: int = 0  # 0: a MobileNetV2-only stage
    ffn_dim: int = 0
    transformers: int = 0


@dataclasses.dataclass(frozen=True)
class MobileViTVariant:
    stem: int
    mv2_expansion: int
    stages: tuple  # five stages; their outputs are the stride-2 .. stride-32 maps
    paper_parameters: float  # millions, with the ImageNet classifier (Mehta & Rastegari 2021, Table 4)


MOBILEVIT_VARIANTS = {
    "mobilevit_xxs": MobileViTVariant(16, 2, (
        Stage(16, 1), Stage(24, 2, 3), Stage(48, 2, 1, 64, 128, 2), Stage(64, 2, 1, 80, 160, 4),
        Stage(80, 2, 1, 96, 192, 3)), 1.3),
    "mobilevit_xs": MobileViTVariant(16, 4, (
        Stage(32, 1), Stage(48, 2, 3), Stage(64, 2, 1, 96, 192, 2), Stage(80, 2, 1, 120, 240, 4),
        Stage(96, 2, 1, 144, 288, 3)), 2.3),
    "mobilevit_s": MobileViTVariant(16, 4, (
        Stage(32, 1), Stage(64, 2, 3), Stage(96, 2, 1, 144, 288, 2), Stage(128, 2, 1, 192, 384, 4),
        Stage(160, 2, 1, 240, 480, 3)), 5.6),
}


def make_divisible(value, divisor=8):
    """ml-cvnets' channel rounding: nearest multiple of ``divisor``, ≥ divisor, ≥ 90 % of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def classifier_parameters(variant, alpha=1.0):
    """Parameters of the ImageNet classifier (Linear exp-channels -> 1000) the encoder leaves out."""
    channels = _last_channels(MOBILEVIT_VARIANTS[variant], alpha)
    return channels * 1000 + 1000


def build_mobilevit_encoder(input_shape, variant="mobilevit_xs", alpha=1.0, weights=None):
    """(B, H, W, 3) RGB in [0, 1] -> dict ``stride2`` .. ``stride32`` maps (the last after conv_1x1_exp).

    ``alpha`` scales every width (rounded by ``make_divisible``; transformer widths stay multiples
    of 8 so the 4 heads divide them) for tiny test networks.
    """
    config = MOBILEVIT_VARIANTS[variant]
    image = keras.Input(input_shape, name=f"{variant}_input")
    x = _conv_bn(image, make_divisible(config.stem * alpha), 3, 2, "stem")
    taps = {}
    for index, stage in enumerate(config.stages, start=1):
        prefix = f"layer{index}"
        channels = make_divisible(stage.channels * alpha)
        for block in range(stage.mv2_blocks):
            x = _inverted_residual(x, channels, stage.stride if block == 0 else 1, config.mv2_expansion,
                                   f"{prefix}_mv2_{block}")
        if stage.transformers:
            x = _mobilevit_block(x, make_divisible(stage.transformer_dim * alpha),
                                 make_divisible(stage.ffn_dim * alpha), stage.transformers, f"{prefix}_mvit")
        taps[f"stride{2 ** index}"] = x
    taps["stride32"] = _conv_bn(x, _last_channels(config, alpha), 1, 1, "conv_1x1_exp")
    encoder = keras.Model(image, taps, name="encoder")
    if weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"encoder_weights file {path!r} not found (expected a {variant} encoder "
                                    f".weights.h5 saved from this builder)")
        encoder.load_weights(path)
    return encoder


def _last_channels(config, alpha):
    return min(LAST_EXPANSION * make_divisible(config.stages[-1].channels * alpha), 960)


def _conv_bn(x, filters, kernel_size, stride, prefix, activation=True):
    """Conv (no bias, PyTorch padding) + BN (+ SiLU)."""
    if stride == 2:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{prefix}_pad")(x)
    x = keras.layers.Conv2D(filters, kernel_size, strides=stride, padding="same" if stride == 1 else "valid",
                            use_bias=False, name=f"{prefix}_conv")(x)
    x = batchnorm_layer(f"{prefix}_bn")(x)
    return keras.layers.Activation("silu", name=f"{prefix}_silu")(x) if activation else x


def _inverted_residual(x, filters, stride, expansion, prefix):
    """MobileNetV2 block: 1×1 expand + SiLU, 3×3 depthwise + SiLU, 1×1 project (residual if shapes match)."""
    inputs, in_channels = x, x.shape[-1]
    hidden = make_divisible(int(round(in_channels * expansion)))
    if expansion != 1:
        x = _conv_bn(x, hidden, 1, 1, f"{prefix}_exp")
    if stride == 2:
        x = keras.layers.ZeroPadding2D(1, name=f"{prefix}_dw_pad")(x)
    x = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same" if stride == 1 else "valid",
                                     use_bias=False, name=f"{prefix}_dw")(x)
    x = batchnorm_layer(f"{prefix}_dw_bn")(x)
    x = keras.layers.Activation("silu", name=f"{prefix}_dw_silu")(x)
    x = _conv_bn(x, filters, 1, 1, f"{prefix}_red", activation=False)
    if stride == 1 and in_channels == filters:
        x = keras.layers.Add(name=f"{prefix}_add")([inputs, x])
    return x


def _mobilevit_block(x, dim, ffn_dim, transformers, prefix):
    """Local representation, global (transformer) representation over patches, fusion."""
    inputs, channels = x, x.shape[-1]
    height, width = x.shape[1], x.shape[2]
    x = _conv_bn(x, channels, 3, 1, f"{prefix}_local3x3")
    x = keras.layers.Conv2D(dim, 1, use_bias=False, name=f"{prefix}_local1x1")(x)
    grid_h, grid_w = (math.ceil(n / PATCH_SIZE) * PATCH_SIZE for n in (height, width))
    if (grid_h, grid_w) != (height, width):  # ml-cvnets: interpolate to the patch grid and back
        x = keras.layers.Resizing(grid_h, grid_w, interpolation="bilinear", name=f"{prefix}_to_grid")(x)
    x = PatchUnfold(PATCH_SIZE, name=f"{prefix}_unfold")(x)
    for index in range(transformers):
        x = _transformer(x, ffn_dim, f"{prefix}_transformer{index}")
    x = LayerNorm(name=f"{prefix}_norm")(x)
    x = PatchFold(PATCH_SIZE, grid_h, grid_w, name=f"{prefix}_fold")(x)
    if (grid_h, grid_w) != (height, width):
        x = keras.layers.Resizing(height, width, interpolation="bilinear", name=f"{prefix}_from_grid")(x)
    x = _conv_bn(x, channels, 1, 1, f"{prefix}_proj")
    x = keras.layers.Concatenate(name=f"{prefix}_concat")([inputs, x])
    return _conv_bn(x, channels, 3, 1, f"{prefix}_fusion")


def _transformer(x, ffn_dim, prefix):
    """Pre-norm transformer: x + MHSA(LN(x)), then x + W2 SiLU(W1 LN(x)) (dropout 0)."""
    dim = x.shape[-1]
    attended = LayerNorm(name=f"{prefix}_norm1")(x)
    attended = MultiHeadSelfAttention(NUM_HEADS, name=f"{prefix}_attention")(attended)
    x = keras.layers.Add(name=f"{prefix}_add1")([x, attended])
    hidden = LayerNorm(name=f"{prefix}_norm2")(x)
    hidden = keras.layers.Dense(ffn_dim, activation="silu", name=f"{prefix}_ffn1")(hidden)
    hidden = keras.layers.Dense(dim, name=f"{prefix}_ffn2")(hidden)
    return keras.layers.Add(name=f"{prefix}_add2")([x, hidden])


@keras.saving.register_keras_serializable(package="mdekd")
class LayerNorm(keras.layers.Layer):
    """Layer normalisation over the last axis: (x − mean)·rsqrt(var + ε)·γ + β, any shape.

    Computes what ``keras.layers.LayerNormalization`` computes, written with one subtraction:
    Keras' form lowers to a NEG that the int8 converter keeps in float, one QUANTIZE/DEQUANTIZE
    island per norm; this one quantises fully (docs/toolchain.md §22).
    """

    def __init__(self, epsilon=LAYERNORM_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        self.gamma = self.add_weight(name="gamma", shape=(input_shape[-1],), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(input_shape[-1],), initializer="zeros")

    def call(self, inputs):
        centred = inputs - ops.mean(inputs, axis=-1, keepdims=True)
        variance = ops.mean(ops.square(centred), axis=-1, keepdims=True)
        return centred * ops.rsqrt(variance + self.epsilon) * self.gamma + self.beta

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="mdekd")
class PatchUnfold(keras.layers.Layer):
    """(B, H, W, d) -> (B, p², H·W/p², d): pixel (i, j) of every p×p patch, over the patches.

    SPACE_TO_DEPTH gathers each patch into one cell (channels ordered patch row, column, d), then a
    reshape and a 4-D transpose; no 5-D or 6-D tensors, so XNNPACK and the GPU delegate take it.
    """

    def __init__(self, patch_size=PATCH_SIZE, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)

    def call(self, inputs):
        _, height, width, dim = inputs.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"{self.name}: {height}x{width} map does not divide into {p}x{p} patches")
        cells = tf.nn.space_to_depth(inputs, p)
        patches = ops.reshape(cells, (-1, (height // p) * (width // p), p * p, dim))
        return ops.transpose(patches, (0, 2, 1, 3))

    def compute_output_shape(self, input_shape):
        batch, height, width, dim = input_shape
        p = self.patch_size
        return (batch, p * p, (height // p) * (width // p), dim)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}


@keras.saving.register_keras_serializable(package="mdekd")
class PatchFold(keras.layers.Layer):
    """The inverse of ``PatchUnfold``: (B, p², H·W/p², d) -> (B, H, W, d)."""

    def __init__(self, patch_size, height, width, **kwargs):
        super().__init__(**kwargs)
        self.patch_size, self.height, self.width = int(patch_size), int(height), int(width)

    def call(self, inputs):
        p, dim = self.patch_size, inputs.shape[-1]
        patches = ops.transpose(inputs, (0, 2, 1, 3))
        cells = ops.reshape(patches, (-1, self.height // p, self.width // p, p * p * dim))
        return tf.nn.depth_to_space(cells, p)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.height, self.width, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size, "height": self.height,
                "width": self.width}
