"""Students: one table of encoders, one NNConv5 decoder with additive skips (FastDepth, Wofk et al. 2019).

``build_student(input_shape, encoder="mobilenet", decoder_attention=None, ...)`` reads
``STUDENT_ENCODERS`` (name -> encoder builder + input normalisation) and ``DECODER_ATTENTIONS``
(name -> layer applied to the decoder's coarsest, stride-32 input). Every encoder returns its maps at
strides 2 .. 32 (``stride2`` .. ``stride32``); the decoder is the reference's for all of them
(dwofk/fast-depth ``MobileNetSkipAdd``, design.md §4): stage i is [DepthwiseConv 5×5 + BN + ReLU,
Conv 1×1 + BN + ReLU, ×2 upsampling], as wide as the encoder's map at its output stride (stage 5:
half of stage 4), skips added after the upsampling at strides 8, 4, 2. The head is the reference's
Conv 1×1 (no bias) + BN, then ``softplus + MIN_DEPTH`` (or exp, ``depth_output="log"``).

FastDepth at α = 1 has the reference's 3,960,930 parameters (3,206,976 encoder + 753,954 decoder).
Decoder BatchNorms use momentum 0.9 and PyTorch's epsilon 1e-5 (design.md §4).

Upsampling: ``"nearest"`` is the reference's, built as ``UpsampleNearest`` (TFLite
``RESIZE_NEAREST_NEIGHBOR``); ``"bilinear"`` (Keras ``UpSampling2D``) is the default the ablations
were run with.
"""

import dataclasses
import functools

import keras

from mdekd.models.attention import DualAttention
from mdekd.models.common import FEATURE_KEYS, batchnorm_layer, check_input_shape
from mdekd.models.layers import ExpDepth, PositiveDepth, UpsampleNearest
from mdekd.models.mobilenet import build_mobilenet_encoder
from mdekd.models.mobilevit import MOBILEVIT_VARIANTS, build_mobilevit_encoder

DECODER_KERNEL_SIZE = 5  # fast-depth MobileNetSkipAdd kernel_size
ENCODER_STRIDES = ("stride32", "stride16", "stride8", "stride4", "stride2")  # decoder stage i outputs [i]
SKIP_STAGES = {2: "stride8", 3: "stride4", 4: "stride2"}  # decoder stage -> encoder map added after it
STAGE_OUTPUTS = dict(enumerate(FEATURE_KEYS, start=1))  # decoder stage -> output key of its map
UPSAMPLING_MODES = ("nearest", "bilinear")
# depth_output -> activation after the head: "softplus" (depth ≈ the head's value, the reference's
# ReLU made > 0) or "log" (the head predicts log depth, docs/design.md §5)
DEPTH_OUTPUTS = {"softplus": PositiveDepth, "log": ExpDepth}


@dataclasses.dataclass(frozen=True)
class StudentEncoder:
    """build(input_shape, alpha, weights) -> Model of (B, H, W, 3) -> {stride2 .. stride32}; the
    input is first mapped from [0, 1] by ``scale``·x + ``offset``."""

    build: object
    scale: float
    offset: float
    description: str


STUDENT_ENCODERS = {
    # MobileNet expects [-1, 1] (keras.applications.mobilenet.preprocess_input)
    "mobilenet": StudentEncoder(build_mobilenet_encoder, 2.0, -1.0, "MobileNet v1 (FastDepth)"),
    # ml-cvnets feeds MobileViT RGB in [0, 1], without mean/std normalisation
    **{name: StudentEncoder(functools.partial(build_mobilevit_encoder, variant=name), 1.0, 0.0,
                            f"MobileViT-{name.split('_')[1].upper()} (Mehta & Rastegari 2021)")
       for name in MOBILEVIT_VARIANTS},
}
# decoder_attention -> layer on the encoder's stride-32 map before the decoder (None: none)
DECODER_ATTENTIONS = {None: None, "dual": DualAttention}


def check_student_options(encoder, decoder_attention, names=("encoder", "decoder_attention")):
    """Raise ValueError listing the registered names for an unknown encoder or attention;
    ``names`` are what the message calls the two settings (e.g. the flags)."""
    if encoder not in STUDENT_ENCODERS:
        raise ValueError(f"{names[0]}: unknown student encoder {encoder!r}; registered: "
                         f"{', '.join(STUDENT_ENCODERS)}")
    if (decoder_attention or None) not in DECODER_ATTENTIONS:
        raise ValueError(f"{names[1]}: unknown {decoder_attention!r}; registered: "
                         f"{', '.join(n for n in DECODER_ATTENTIONS if n)} (or none)")


def student_name(encoder="mobilenet", decoder_attention=None):
    """The model name: ``fastdepth`` for the reference, else ``<encoder>_nnconv5[_<attention>]``."""
    base = "fastdepth" if encoder == "mobilenet" else f"{encoder}_nnconv5"
    return f"{base}_{decoder_attention}" if decoder_attention else base


def build_student(input_shape=(480, 640, 3), encoder="mobilenet", decoder_attention=None, encoder_weights=None,
                  upsampling="bilinear", alpha=1.0, depth_output="softplus", name=None):
    """Build a student for a fixed input size.

    Args:
      input_shape: (H, W, 3), H and W multiples of 32.
      encoder: a key of ``STUDENT_ENCODERS`` ("mobilenet", "mobilevit_xxs", "mobilevit_xs", "mobilevit_s").
      decoder_attention: None or a key of ``DECODER_ATTENTIONS`` ("dual").
      encoder_weights: None (random); a weights file of the encoder; MobileNet also "imagenet"
        (Keras' file, from the Keras cache or downloaded).
      upsampling: "bilinear" (default) or "nearest" (the reference's).
      alpha: width multiplier of encoder and decoder (small α for tests).
      depth_output: a key of ``DEPTH_OUTPUTS``, the head's activation ("softplus" or "log").
      name: model name; default ``student_name(encoder, decoder_attention)``.
    Returns:
      keras.Model: image (B, H, W, 3) RGB float32 in [0, 1] -> dict ``depth`` (B, H, W, 1) metres > 0,
      ``stride16`` .. ``stride2`` decoder maps (B, H/s, W/s, C).
    """
    input_shape = check_input_shape(input_shape)
    decoder_attention = decoder_attention or None
    check_student_options(encoder, decoder_attention)
    if upsampling not in UPSAMPLING_MODES:
        raise ValueError(f"upsampling must be one of {UPSAMPLING_MODES}, got {upsampling!r}")
    if depth_output not in DEPTH_OUTPUTS:
        raise ValueError(f"depth_output must be one of {tuple(DEPTH_OUTPUTS)}, got {depth_output!r}")
    spec = STUDENT_ENCODERS[encoder]
    encoder_model = spec.build(input_shape, alpha=alpha, weights=encoder_weights)

    image = keras.Input(input_shape, name="image")
    x = image
    if (spec.scale, spec.offset) != (1.0, 0.0):
        x = keras.layers.Rescaling(spec.scale, offset=spec.offset, name=f"{encoder}_normalization")(x)
    features = encoder_model(x)

    x = features["stride32"]
    if decoder_attention:
        x = DECODER_ATTENTIONS[decoder_attention](name=f"decoder_{decoder_attention}_attention")(x)
    widths = [features[key].shape[-1] for key in ENCODER_STRIDES[1:]]
    widths.append(widths[-1] // 2)
    outputs = {}
    for stage, width in enumerate(widths, start=1):
        x = _nnconv5_stage(x, width, f"decode{stage}", upsampling)
        if stage in SKIP_STAGES:
            x = keras.layers.Add(name=f"decode{stage}_skip")([x, features[SKIP_STAGES[stage]]])
        if stage in STAGE_OUTPUTS:
            outputs[STAGE_OUTPUTS[stage]] = x
    x = keras.layers.Conv2D(1, 1, use_bias=False, name="head_conv")(x)
    x = batchnorm_layer("head_bn")(x)
    depth = DEPTH_OUTPUTS[depth_output](name="depth")(x)
    return keras.Model(image, {"depth": depth, **outputs}, name=name or student_name(encoder, decoder_attention))


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
