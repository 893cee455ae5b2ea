"""ResNeSt encoder (Zhang et al. 2020) as timm implements it, exact to fp32 (design.md §4).

One builder reads the variant table. Radix 2, cardinality 1, base width 64, deep stem, avg-down
shortcut, avd pool after the split-attention conv in the first block of stages 2–4, BN epsilon
1e-5. Torch padding is reproduced exactly (tests/fixtures/README.md and docs/design.md §4).

Layer names are timm's module paths with '.' replaced by '_' (``layer1.0.conv2.fc1`` ->
``layer1_0_conv2_fc1``; timm module names contain no '_'), so timm weights map by name
(``mdekd.models.timm_weights``). Weightless layers are named the same way (``conv1_2`` is timm's
ReLU at index 2 of the stem Sequential) or with a suffix (``maxpool_pad``).
"""

import keras

from mdekd.models.common import batchnorm_layer
from mdekd.models.layers import GroupedConv2D, RadixAttention, RadixSum

# variant -> (blocks per stage, stem width); timm resnest.py (resnest14d .. resnest269e)
RESNEST_VARIANTS = {
    "resnest14": ((1, 1, 1, 1), 32),
    "resnest26": ((2, 2, 2, 2), 32),
    "resnest50": ((3, 4, 6, 3), 32),
    "resnest101": ((3, 4, 23, 3), 64),
    "resnest200": ((3, 24, 36, 3), 64),
    "resnest269": ((3, 30, 48, 8), 64),
}
STAGE_PLANES = (64, 128, 256, 512)  # bottleneck widths of layer1..4; outputs are 4× these
BOTTLENECK_EXPANSION = 4
RADIX = 2
BASE_WIDTH = 64  # with cardinality 1 the group width equals the planes
# Output key of each stage: C2..C5 at strides 4, 8, 16, 32 (256, 512, 1024, 2048 channels)
STAGE_OUTPUTS = ("c2", "c3", "c4", "c5")


def build_resnest(variant="resnest101", input_shape=(None, None, 3), name=None):
    """Build a ResNeSt encoder without the classifier.

    Args:
      variant: a key of ``RESNEST_VARIANTS``.
      input_shape: (H, W, 3); any size works (None allowed), odd sizes included.
      name: model name, the variant by default.
    Returns:
      keras.Model: ImageNet-normalised image (B, H, W, 3) -> dict ``c2``..``c5``
      (B, ⌈H/s⌉, ⌈W/s⌉, C) for s = 4, 8, 16, 32.
    """
    if variant not in RESNEST_VARIANTS:
        raise ValueError(f"unknown ResNeSt variant {variant!r}; known variants: {', '.join(RESNEST_VARIANTS)}")
    blocks_per_stage, stem_width = RESNEST_VARIANTS[variant]
    image = keras.Input(input_shape, name="image")
    x = _deep_stem(image, stem_width)
    outputs = {}
    for stage, (planes, blocks, key) in enumerate(zip(STAGE_PLANES, blocks_per_stage, STAGE_OUTPUTS), start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            x = _bottleneck(x, planes, stride, has_downsample=block == 0, prefix=f"layer{stage}_{block}")
        outputs[key] = x
    return keras.Model(image, outputs, name=name or variant)


def _conv(filters, kernel_size, name, strides=1, padding="same", use_bias=False):
    return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=use_bias, name=name)


def _deep_stem(x, stem_width):
    """3×3 s2 -> 3×3 -> 3×3 to 2·stem_width, BN + ReLU, then 3×3 s2 max pool (stride 4)."""
    # torch pads 1 on every side; Keras 'same' with stride 2 would pad only bottom/right on even sizes
    x = keras.layers.ZeroPadding2D(1, name="conv1_0_pad")(x)
    x = _conv(stem_width, 3, "conv1_0", strides=2, padding="valid")(x)
    x = batchnorm_layer("conv1_1")(x)
    x = keras.layers.ReLU(name="conv1_2")(x)
    x = _conv(stem_width, 3, "conv1_3")(x)
    x = batchnorm_layer("conv1_4")(x)
    x = keras.layers.ReLU(name="conv1_5")(x)
    x = _conv(2 * stem_width, 3, "conv1_6")(x)
    x = batchnorm_layer("bn1")(x)
    x = keras.layers.ReLU(name="act1")(x)
    # zero padding equals torch's -inf padding here because the input is >= 0 after ReLU
    x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)


def _bottleneck(x, planes, stride, has_downsample, prefix):
    """timm ResNestBottleneck: 1×1 -> split-attention 3×3 -> [avd pool] -> 1×1, + shortcut, ReLU."""
    group_width = planes * BASE_WIDTH // 64
    shortcut = x
    if has_downsample:
        if stride > 1:
            # AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) == Keras 'same' (pads not counted)
            shortcut = keras.layers.AveragePooling2D(2, 2, padding="same", name=f"{prefix}_downsample_0")(shortcut)
        shortcut = _conv(planes * BOTTLENECK_EXPANSION, 1, f"{prefix}_downsample_1")(shortcut)
        shortcut = batchnorm_layer(f"{prefix}_downsample_2")(shortcut)

    y = _conv(group_width, 1, f"{prefix}_conv1")(x)
    y = batchnorm_layer(f"{prefix}_bn1")(y)
    y = keras.layers.ReLU(name=f"{prefix}_act1")(y)
    y = _split_attention(y, group_width, f"{prefix}_conv2")
    if stride > 1:
        # avd: AvgPool2d(3, 2, padding=1, count_include_pad=True) -> zero pad + 'valid' (pads counted)
        y = keras.layers.ZeroPadding2D(1, name=f"{prefix}_avd_last_pad")(y)
        y = keras.layers.AveragePooling2D(3, stride, padding="valid", name=f"{prefix}_avd_last")(y)
    y = _conv(planes * BOTTLENECK_EXPANSION, 1, f"{prefix}_conv3")(y)
    y = batchnorm_layer(f"{prefix}_bn3")(y)
    y = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{prefix}_act3")(y)


def _split_attention(x, channels, prefix, radix=RADIX):
    """timm SplitAttn (cardinality 1): (B, H, W, C_in) -> (B, H, W, channels)."""
    attention_channels = _make_divisible(channels * radix * 0.25, divisor=8, min_value=32)
    x = GroupedConv2D(channels * radix, 3, padding="same", groups=radix, use_bias=False, name=f"{prefix}_conv")(x)
    x = batchnorm_layer(f"{prefix}_bn0")(x)
    splits = keras.layers.ReLU(name=f"{prefix}_act0")(x)
    gap = RadixSum(radix, name=f"{prefix}_split_sum")(splits)
    gap = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{prefix}_gap")(gap)
    a = _conv(attention_channels, 1, f"{prefix}_fc1", use_bias=True)(gap)
    a = batchnorm_layer(f"{prefix}_bn1")(a)
    a = keras.layers.ReLU(name=f"{prefix}_act1")(a)
    logits = _conv(channels * radix, 1, f"{prefix}_fc2", use_bias=True)(a)
    return RadixAttention(radix, name=f"{prefix}_attention")([splits, logits])


def _make_divisible(value, divisor=8, min_value=None, round_limit=0.9):
    """timm.layers.make_divisible: nearest multiple of divisor, at least min_value, ≥ 90 % of value."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded
