"""Depth conventions shared by data, losses and metrics (design.md preamble).

Depth is in metres; a ground-truth pixel is valid where ``MIN_DEPTH < depth <= MAX_DEPTH``;
invalid pixels are stored as 0.
"""

MIN_DEPTH = 1e-3  # metres; design.md preamble, also the clamp applied to predictions before any log
MAX_DEPTH = 40.0  # metres; design.md preamble, the cap of MAI2021 and of the synthetic scenes
