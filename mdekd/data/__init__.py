"""Data: dataset layouts and pairing, the tf.data pipeline, augmentation, synthetic scenes.

``from mdekd.data import build_dataset`` etc. work as usual, but each name is imported on first
use: the synthetic-scene generator and its worker processes need only numpy and PIL, and should
not pay for importing TensorFlow.
"""

import importlib

_EXPORTS = {
    "LAYOUTS": "pairs",
    "Layout": "pairs",
    "check_pairs": "pairs",
    "list_pairs": "pairs",
    "list_images": "pairs",
    "depth_file_for": "pairs",
    "IMAGE_EXTENSIONS": "pairs",
    "read_depth_png": "pairs",
    "read_rgb": "pairs",
    "resolve_layout": "pairs",
    "build_dataset": "loader",
    "build_unlabeled_dataset": "loader",
    "mix_batches": "loader",
    "decode_depth": "loader",
    "decode_rgb": "loader",
    "mask_invalid": "loader",
    "num_examples": "loader",
    "augment_example": "augment",
    "random_geometric": "augment",
    "random_photometric": "augment",
    "describe_dataset": "stats",
    "format_description": "stats",
    "generate_dataset": "synthetic",
    "render_scene": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
