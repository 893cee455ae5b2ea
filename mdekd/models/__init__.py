"""Depth models: the students (FastDepth, MobileViT), the ResNeSt teacher, their registered layers and cost counts."""

from mdekd.models import layers  # noqa: F401  (registers the custom layers before any load_model)
from mdekd.models.common import inference_model, set_depth_prior
from mdekd.models.deploy import deploy_model
from mdekd.models.macs import cost_breakdown, cost_table, count_macs, trainable_parameter_count
from mdekd.models.resnest import RESNEST_VARIANTS, build_resnest
from mdekd.models.student import DECODER_ATTENTIONS, STUDENT_ENCODERS, build_student
from mdekd.models.teacher import build_teacher
from mdekd.models.timm_weights import load_timm_resnest_weights

__all__ = [
    "DECODER_ATTENTIONS",
    "RESNEST_VARIANTS",
    "STUDENT_ENCODERS",
    "build_resnest",
    "build_student",
    "build_teacher",
    "cost_breakdown",
    "cost_table",
    "count_macs",
    "deploy_model",
    "inference_model",
    "load_timm_resnest_weights",
    "set_depth_prior",
    "trainable_parameter_count",
]
