"""A training run's settings (``TrainConfig``) and their checks, before anything is built.

``train.py`` defines one flag per field; a notebook builds a ``TrainConfig`` directly. Every check
raises ValueError (or FileNotFoundError) naming the flag and what was expected.
"""

import dataclasses
import os

import tensorflow as tf

from mdekd import distill, losses
from mdekd.multi_worker import DISTRIBUTIONS

MODES = ("teacher", "student", "distill")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; field names are the ``train.py`` flag names."""

    mode: str = "student"
    output_dir: str = "runs/student"
    # data
    dataset: str = "synthetic"
    data_dir: str = "data/synthetic"
    depth_scale: float | None = None
    synthetic_train: int = 200
    synthetic_validation: int = 40
    height: int = 128
    width: int = 160
    augment: bool = True
    # optimisation
    batch_size: int = 8
    epochs: int = 3
    steps_per_epoch: int = 0  # 0: one pass over the training set
    validation_steps: int = 0  # 0: the whole validation split
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    # losses (docs/design.md §1 defaults)
    lambda_si: float = losses.DEFAULT_LAMBDA_SI
    lambda_gml: float = losses.DEFAULT_LAMBDA_GML
    lambda_d: float = losses.DEFAULT_LAMBDA_D
    lambda_response: float = 0.0
    variance_focus: float = losses.METRIC_VARIANCE_FOCUS
    distill_strides: tuple = distill.DISTILL_STRIDES
    pool_scale: float | None | dict = losses.DEFAULT_POOL_SCALE
    feature_activation: str = ""  # "" = the maps as output (paper), "relu"
    # unlabelled photos (distill mode): a fraction of every batch, distillation terms only
    unlabeled_dir: str = ""
    unlabeled_ratio: float = 0.0
    teacher_cache: bool = False  # precompute the teacher's targets once (needs augment=False)
    # networks
    teacher: str = ""
    teacher_encoder: str = "resnest101"
    teacher_decoder_channels: int = 256
    student_encoder: str = "mobilenet"  # a key of mdekd.models.STUDENT_ENCODERS
    decoder_attention: str = ""  # "" (none) or a key of mdekd.models.DECODER_ATTENTIONS
    student_alpha: float = 1.0
    upsampling: str = "bilinear"
    depth_output: str = "softplus"  # "log": the head predicts log depth (int8-friendly)
    encoder_weights: str = ""
    # execution
    seed: int = 0
    distribution: str = "none"
    sync_batch_norm: bool = True
    mixed_precision: bool = False

    @property
    def input_shape(self):
        return (self.height, self.width, 3)


def validate_config(config):
    """Raise ValueError naming the flag for settings that cannot work, before anything is built."""
    if config.mode not in MODES:
        raise ValueError(f"--mode: unknown mode '{config.mode}'; expected one of {MODES}")
    if config.distribution not in DISTRIBUTIONS:
        raise ValueError(f"--distribution: unknown '{config.distribution}'; expected one of {DISTRIBUTIONS}")
    if config.mode == "distill":
        if not config.teacher:
            raise ValueError("--mode=distill needs --teacher (a teacher .keras file or weights file)")
        if not os.path.exists(config.teacher):
            raise FileNotFoundError(f"--teacher: file not found: {config.teacher}")
        unknown = [s for s in config.distill_strides if s not in distill.DISTILL_STRIDES]
        if unknown or not config.distill_strides:
            raise ValueError(f"--distill_strides: {list(config.distill_strides)} must be a non-empty "
                             f"subset of {list(distill.DISTILL_STRIDES)}")
        if (config.feature_activation or None) not in distill.FEATURE_ACTIVATIONS:
            raise ValueError(f"--feature_activation: expected '' or 'relu', got "
                             f"'{config.feature_activation}'")
        if config.teacher_cache and config.augment:
            raise ValueError("--teacher_cache needs --noaugment: targets computed once cannot follow "
                             "augmented images (without the cache the teacher sees each augmented batch)")
    elif config.unlabeled_dir or config.lambda_response:
        raise ValueError("--unlabeled_dir and --lambda_response need --mode=distill (a teacher)")
    losses.check_variance_focus(config.variance_focus, "--variance_focus")
    if config.mode != "teacher":
        from mdekd.models.student import check_student_options

        check_student_options(config.student_encoder, config.decoder_attention,
                              names=("--student_encoder", "--decoder_attention"))
    if unlabeled_per_batch(config):
        from mdekd.data import list_images

        list_images(config.unlabeled_dir)  # missing, empty or image-less folders fail here
    if config.height % 32 or config.width % 32:
        raise ValueError(f"--height/--width: {config.height}x{config.width} must both be divisible by 32")
    if config.batch_size < 1 or config.epochs < 1:
        raise ValueError("--batch_size and --epochs must be at least 1")
    if config.mixed_precision and not tf.config.list_physical_devices("GPU"):
        raise ValueError("--mixed_precision needs a GPU: on CPU mixed_float16 is 4-5x slower and "
                         "cannot be exported to TFLite (toolchain.md §12); train in float32 on CPU")


def parse_pool_scale(text):
    """``--pool_scale``: a number, 'none', or 'stride16:none,stride8:0.25,...' (one per stride)."""
    def value(item):
        item = item.strip().lower()
        try:
            return None if item in ("none", "") else float(item)
        except ValueError:
            raise ValueError(f"--pool_scale: expected a number or 'none', got '{text}'") from None

    if ":" not in text:
        return value(text)
    grid = {}
    for item in text.split(","):
        name, _, scale = item.partition(":")
        if name.strip() not in distill.DISTILL_STRIDES:
            raise ValueError(f"--pool_scale: unknown stride '{name}' in '{text}'; expected "
                             f"{list(distill.DISTILL_STRIDES)}")
        grid[name.strip()] = value(scale)
    return grid


def unlabeled_per_batch(config):
    """Unlabelled frames per batch, ``--unlabeled_ratio × --batch_size``, which must be whole."""
    ratio = config.unlabeled_ratio
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--unlabeled_ratio: expected a fraction in [0, 1), got {ratio}")
    if ratio and not config.unlabeled_dir:
        raise ValueError(f"--unlabeled_ratio={ratio} needs --unlabeled_dir (a folder of photos)")
    if config.unlabeled_dir and not ratio:
        raise ValueError("--unlabeled_dir needs --unlabeled_ratio > 0 (the share of each batch)")
    count = ratio * config.batch_size
    if abs(count - round(count)) > 1e-9:
        raise ValueError(f"--unlabeled_ratio={ratio} × --batch_size={config.batch_size} = {count:g} "
                         "unlabelled frames per batch; choose values whose product is a whole number")
    return int(round(count))
