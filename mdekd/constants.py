"""Depth conventions shared by data, losses and metrics (design.md preamble).

Depth is in metres; a ground-truth pixel is valid where ``MIN_DEPTH < depth <= MAX_DEPTH``;
invalid pixels are stored as 0.
"""

MIN_DEPTH = 1e-3  # metres; design.md preamble, also the clamp applied to predictions before any log
MAX_DEPTH = 40.0  # metres; design.md preamble, the cap of MAI2021 and of the synthetic scenes


def valid_depth(depth, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH):
    """Where a ground-truth depth (metres) is valid: ``min_depth < d <= max_depth`` (``max_depth=None``:
    no cap); NaN and ±inf never are. The one definition of the rule, for numpy arrays and TF tensors.
    """
    valid = (depth > min_depth) & (depth < float("inf"))
    if max_depth is not None:
        valid = valid & (depth <= max_depth)
    return valid
