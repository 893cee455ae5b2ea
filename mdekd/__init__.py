"""mdekd: knowledge distillation for fast and accurate monocular depth estimation on mobile devices."""

__version__ = "0.1.0"
