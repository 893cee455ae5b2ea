"""Depth models: the FastDepth student, the ResNeSt teacher, their registered layers and cost counts."""

from mdekd.models import layers  # noqa: F401  (registers the custom layers before any load_model)
from mdekd.models.common import inference_model
from mdekd.models.macs import cost_breakdown, count_macs, trainable_parameter_count
from mdekd.models.student import build_student

__all__ = [
    "build_student",
    "cost_breakdown",
    "count_macs",
    "inference_model",
    "trainable_parameter_count",
]
