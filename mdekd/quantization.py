"""The TFLite quantisation modes as one table: name, label, converter settings, verification gate.

``export.py --quantize NAME`` takes a mode's ``name``; reports, file names and the benchmarks use
its ``label`` (``none`` is labelled ``fp32``). ``mdekd.export`` applies ``configure_converter``
and gates every conversion with the mode's ``tolerance``; ``benchmark.latency`` and
``benchmark.accuracy`` iterate over ``LABELS``. design.md §5 explains the modes.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Largest accepted TFLite-vs-Keras disagreement of one mode (depth in metres, > 0).

    Errors are per pixel and relative, r = |d_tflite − d_keras| / d_keras (depth is > 0 by
    construction), so they do not depend on the scene's scale: ``mean_relative`` bounds the mean
    of r, ``p99_relative`` its 99th percentile, ``max_relative`` its maximum (None: not gated).
    With ground truth, the design.md §2 metrics of both models are compared too: ``metric_drift``
    bounds |m_tflite − m_keras| / m_keras for si_rmse and abs_rel, and ``delta1_drop`` bounds how
    much δ<1.25 may fall (absolute fraction of pixels).
    """

    mean_relative: float
    p99_relative: float
    max_relative: float | None
    metric_drift: float
    delta1_drop: float


@dataclasses.dataclass(frozen=True)
class QuantMode:
    """One conversion mode of ``tf.lite.TFLiteConverter``."""

    name: str  # --quantize value
    label: str  # reports, file names, benchmark variants
    description: str
    optimize: bool  # converter.optimizations = [Optimize.DEFAULT]
    float16_weights: bool  # target_spec.supported_types = [float16]
    integer_only: bool  # calibrated full-integer kernels (needs representative images)
    tolerance: Tolerance
    # integer_only: keep the weightless single-channel tail (late upsampling, depth activation)
    # in float, so the last int8 tensor is the head's output (docs/design.md §5)
    float_tail: bool = False


# Why these gates (measured at 128×160 on a student trained 96 steps on synthetic scenes, and on
# random students). fp32 differs from Keras by summation order only: ~1e-7 relative on a trained
# or freshly initialised student, 2.5e-5 mean / 3.7e-4 max on a random one whose BatchNorm
# statistics were set from images (random weights with normalised activations amplify rounding
# layer by layer); the gates leave >= 4× margin and are 1000× below a wrong weight or op. fp16
# weights carry 2^-11 ≈ 5e-4 relative rounding each: 0.2 % mean error measured; gate 1 %.
# Dynamic-range and int8 add quantisation noise: int8 measured 4.6 % mean, 20 % at p99 and 64 %
# at worst (a far pixel beyond the calibrated output range; the int8 output has 256 levels),
# with si-RMSE unchanged (-0.05 %): so int8/dynamic gate the mean (15 %) and p99 (50 %), not the
# maximum. A broken conversion (saturated activation ranges, inputs in 0-255 instead of [0, 1],
# a mis-scaled head) errs by tens of per cent to 100 % on most pixels. These are sanity gates that
# must also pass on untrained networks and a few images: the accuracy targets (int8 <= 2 %,
# fp16 <= 0.1 % relative si-RMSE on a trained student) are measured by ``benchmark.accuracy``.
_MODES = (
    QuantMode("none", "fp32", "float32", optimize=False, float16_weights=False, integer_only=False,
              tolerance=Tolerance(mean_relative=1e-4, p99_relative=1e-3, max_relative=1e-2,
                                  metric_drift=1e-3, delta1_drop=1e-3)),
    QuantMode("fp16", "fp16", "float16 weights (dequantised to float32 on a CPU, toolchain.md §8)",
              optimize=True, float16_weights=True, integer_only=False,
              tolerance=Tolerance(mean_relative=1e-2, p99_relative=5e-2, max_relative=0.25,
                                  metric_drift=1e-2, delta1_drop=1e-2)),
    QuantMode("dynamic", "dynamic", "int8 weights, float activations (dynamic range)",
              optimize=True, float16_weights=False, integer_only=False,
              tolerance=Tolerance(mean_relative=0.15, p99_relative=0.5, max_relative=None,
                                  metric_drift=0.10, delta1_drop=0.05)),
    QuantMode("int8", "int8", "full integer, activations calibrated on training images; float "
              "input/output kept", optimize=True, float16_weights=False, integer_only=True,
              tolerance=Tolerance(mean_relative=0.15, p99_relative=0.5, max_relative=None,
                                  metric_drift=0.10, delta1_drop=0.05), float_tail=True),
)
QUANT_MODES = {mode.name: mode for mode in _MODES}
NAMES = tuple(QUANT_MODES)
LABELS = tuple(mode.label for mode in _MODES)


def get_mode(name):
    """The mode called ``name`` (``--quantize`` value); ValueError listing the known ones."""
    if name not in QUANT_MODES:
        raise ValueError(f"--quantize: expected one of {', '.join(NAMES)}, got {name!r}")
    return QUANT_MODES[name]


def mode_of_label(label):
    """The mode whose label is ``label`` (``fp32`` -> ``none``)."""
    for mode in _MODES:
        if mode.label == label:
            return mode
    raise ValueError(f"unknown quantisation label {label!r}; expected one of {', '.join(LABELS)}")


def configure_converter(converter, mode, representative_dataset=None, ranges_in_model=False):
    """Apply ``mode``'s settings to a ``tf.lite.TFLiteConverter`` (in place).

    ranges_in_model: the graph holds its activation ranges (FakeQuant ops of a quantisation-aware
    model, ``mdekd.quantization_aware``), so int8 needs no representative data; tensors without a
    range stay float."""
    import tensorflow as tf

    if mode.optimize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode.float16_weights:
        converter.target_spec.supported_types = [tf.float16]
    if mode.integer_only and not ranges_in_model:
        if representative_dataset is None:
            raise ValueError(f"--quantize {mode.name} needs representative data (training images) "
                             "for the activation ranges: pass --representative_data DIR")
        converter.representative_dataset = representative_dataset
        if not mode.float_tail:  # a float tail needs float kernels beside the int8 ones
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # float32 input and output are kept (the converter's default): callers feed [0, 1] images.
    return converter
