"""mdekd: knowledge distillation for fast and accurate monocular depth estimation on mobile devices."""

import os

# TensorFlow's C++ start-up chatter (CUDA probing on CPU machines, oneDNN notes) drowns the CLIs'
# own output; a user can still ask for it with TF_CPP_MIN_LOG_LEVEL=0.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
