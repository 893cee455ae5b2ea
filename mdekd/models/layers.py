"""Registered custom layers shared by the student, the teacher and the ResNeSt encoder.

Each layer is registered under the package ``mdekd`` so that ``.keras`` files of both models load
with plain ``keras.models.load_model`` once ``mdekd.models`` is imported. All of them lower to TFLite
builtin ops (no Flex) and run on CPU without XLA.
"""

import math

import keras
import tensorflow as tf
from keras import ops

from mdekd.constants import MIN_DEPTH


class _UpsampleByFactor(keras.layers.Layer):
    """×factor upsampling with one ``tf.raw_ops`` resize: (B, H, W, C) -> (B, f·H, f·W, C).

    Uses the static H, W when they are known at build time (the models are built for a fixed
    input size), so the TFLite op gets a constant size. Subclasses choose the resize.
    """

    def __init__(self, factor=2, **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)

    def call(self, inputs):
        height, width = inputs.shape[1], inputs.shape[2]
        if height is None or width is None:
            size = tf.shape(inputs)[1:3] * self.factor
        else:
            size = tf.constant([height * self.factor, width * self.factor], tf.int32)
        return self._resize(inputs, size)

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        scale = lambda n: None if n is None else n * self.factor  # noqa: E731
        return (batch, scale(height), scale(width), channels)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="mdekd")
class UpsampleBilinearAlignCorners(_UpsampleByFactor):
    """Bilinear ×factor upsampling with ``align_corners=True`` (PyTorch ``nn.Upsample`` semantics).

    Corner pixels of input and output coincide, as in the Xian et al. decoder. Lowers to TFLite
    ``RESIZE_BILINEAR(align_corners=True)``.
    """

    def _resize(self, inputs, size):
        # tf.image.resize (v2) has no align_corners; this op is the one TFLite and XLA implement.
        return tf.raw_ops.ResizeBilinear(images=inputs, size=size, align_corners=True, half_pixel_centers=False)


@keras.saving.register_keras_serializable(package="mdekd")
class UpsampleNearest(_UpsampleByFactor):
    """Nearest-neighbour ×factor upsampling.

    Each output pixel copies input pixel (⌊y/factor⌋, ⌊x/factor⌋), as PyTorch's
    ``F.interpolate(mode="nearest")`` in the FastDepth reference and Keras' nearest
    ``UpSampling2D``; but it lowers to TFLite's ``RESIZE_NEAREST_NEIGHBOR`` (one XNNPACK kernel)
    where ``UpSampling2D`` lowers to a TILE + RESHAPE chain (docs/toolchain.md §5).
    """

    def _resize(self, inputs, size):
        # half_pixel_centers=False with align_corners=False is the floor(y / factor) rule.
        return tf.raw_ops.ResizeNearestNeighbor(images=inputs, size=size, align_corners=False,
                                                half_pixel_centers=False)


@keras.saving.register_keras_serializable(package="mdekd")
class PositiveDepth(keras.layers.Layer):
    """Depth head activation: ``softplus(x) + min_depth`` metres, so depth > 0 everywhere.

    (B, H, W, 1) pre-activation -> (B, H, W, 1) metres. Softplus is written as
    ``relu(x) + log(1 + exp(-|x|))``: the same function, but it never overflows (TFLite lowers
    ``tf.nn.softplus`` to ``log(1 + exp(x))``, which is inf above x ≈ 88), and ``min_depth`` keeps
    the output strictly positive where softplus underflows to 0 for very negative x.
    """

    def __init__(self, min_depth=MIN_DEPTH, **kwargs):
        super().__init__(**kwargs)
        self.min_depth = float(min_depth)

    def call(self, inputs):
        softplus = ops.relu(inputs) + ops.log(1.0 + ops.exp(-ops.abs(inputs)))
        return softplus + self.min_depth

    def inverse(self, depth):
        """The pre-activation (float) whose output is ``depth`` metres."""
        target = max(float(depth) - self.min_depth, 1e-3)
        return target + math.log(-math.expm1(-target))  # softplus⁻¹, stable for large targets

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "min_depth": self.min_depth}


@keras.saving.register_keras_serializable(package="mdekd")
class ExpDepth(keras.layers.Layer):
    """Depth head activation for a head that predicts **log depth**: ``exp(x)`` metres.

    (B, H, W, 1) log-depth -> (B, H, W, 1) metres, clipped to [min_depth, e^80] so it is > 0 and
    finite. The tensor before it is log depth, so int8 quantisation of the network errs by a fixed
    *fraction* of the depth at every distance (a step of ln(40/0.1)/256 ≈ 2.3 % over 0.1-40 m)
    rather than by a fixed number of metres (docs/design.md §5, int8 depth precision).
    """

    MAX_LOG_DEPTH = 80.0  # exp(80) ≈ 5.5e34 is still finite in float32

    def __init__(self, min_depth=MIN_DEPTH, **kwargs):
        super().__init__(**kwargs)
        self.min_depth = float(min_depth)

    def call(self, inputs):
        return ops.exp(ops.clip(inputs, math.log(self.min_depth), self.MAX_LOG_DEPTH))

    def inverse(self, depth):
        """The pre-activation (log depth) whose output is ``depth`` metres."""
        return math.log(max(float(depth), self.min_depth))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "min_depth": self.min_depth}


@keras.saving.register_keras_serializable(package="mdekd")
class GroupedConv2D(keras.layers.Conv2D):
    """``Conv2D`` with ``groups > 1`` computed as one convolution per group, then concatenated.

    Same kernel layout and result as ``Conv2D(groups=g)`` (kernel (kh, kw, C_in/g, C_out); group i
    reads input channels [i·C_in/g, (i+1)·C_in/g) and writes outputs [i·C_out/g, (i+1)·C_out/g),
    PyTorch's contiguous grouping), but without Keras' XLA-only grouped path on CPU, so it runs
    in plain TF graphs, on any device and in TFLite.
    """

    def convolution_op(self, inputs, kernel):
        if self.groups == 1:
            return super().convolution_op(inputs, kernel)
        input_groups = ops.split(inputs, self.groups, axis=-1)
        kernel_groups = ops.split(kernel, self.groups, axis=-1)
        outputs = [
            ops.conv(
                x,
                k,
                strides=list(self.strides),
                padding=self.padding,
                dilation_rate=self.dilation_rate,
                data_format=self.data_format,
            )
            for x, k in zip(input_groups, kernel_groups)
        ]
        return ops.concatenate(outputs, axis=-1)


@keras.saving.register_keras_serializable(package="mdekd")
class RadixSum(keras.layers.Layer):
    """Sum of the ``radix`` contiguous channel splits: (B, H, W, R·C) -> (B, H, W, C).

    Split r is channels [r·C, (r+1)·C), as ResNeSt's ``x.view(B, R, C, H, W)``.
    """

    def __init__(self, radix, **kwargs):
        super().__init__(**kwargs)
        self.radix = int(radix)

    def call(self, inputs):
        return sum(ops.split(inputs, self.radix, axis=-1))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] // self.radix)

    def get_config(self):
        return {**super().get_config(), "radix": self.radix}


@keras.saving.register_keras_serializable(package="mdekd")
class RadixAttention(keras.layers.Layer):
    """Split attention: weight each radix split by its attention and sum the splits.

    Inputs ``[splits (B, H, W, R·C), logits (B, 1, 1, R·C)]`` -> (B, H, W, C). The logit of split r,
    channel c is index r·C + c; a softmax across r per channel (sigmoid when R = 1), as timm's
    ``RadixSoftmax`` with cardinality 1.
    """

    def __init__(self, radix, **kwargs):
        super().__init__(**kwargs)
        self.radix = int(radix)

    def call(self, inputs):
        splits, logits = inputs
        if self.radix == 1:
            return splits * ops.sigmoid(logits)
        # Softmax across the R splits written elementwise (max-subtracted), so that no op needs a
        # softmax over a non-last axis.
        logit_splits = ops.split(logits, self.radix, axis=-1)
        largest = logit_splits[0]
        for logit in logit_splits[1:]:
            largest = ops.maximum(largest, logit)
        exps = [ops.exp(logit - largest) for logit in logit_splits]
        total = sum(exps)
        return sum(e * x for e, x in zip(exps, ops.split(splits, self.radix, axis=-1))) / total

    def compute_output_shape(self, input_shapes):
        splits_shape = input_shapes[0]
        return (*splits_shape[:-1], splits_shape[-1] // self.radix)

    def get_config(self):
        return {**super().get_config(), "radix": self.radix}


@keras.saving.register_keras_serializable(package="mdekd")
class FakeQuant(keras.layers.Layer):
    """int8 fake quantisation of one tensor over a stored range [range_min, range_max].

    (B, H, W, C) -> same shape, each value rounded to the nearest of 256 levels over the range and
    clipped to it (gradient: straight through inside the range, 0 outside). Lowers to TF's
    ``FakeQuantWithMinMaxVars``, whose range TFLite's converter uses for the tensor's int8 scale
    and zero point (docs/design.md §5, quantisation-aware fine-tuning). The range is a pair of
    non-trainable weights, set while ``observing`` (pass-through, widening the range to what it
    sees; ``mdekd.quantization_aware.calibrate``) and fixed otherwise: fine-tuning with ranges that
    follow the batches was measured to undo what the weights learn (design.md §5).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.observing = False  # set by mdekd.quantization_aware.calibrate (eager calls only)

    def build(self, input_shape):
        self.range_min = self.add_weight(shape=(), initializer="zeros", trainable=False, name="range_min")
        self.range_max = self.add_weight(shape=(), initializer="zeros", trainable=False, name="range_max")

    def call(self, inputs):
        if self.observing:
            # The range always holds 0, as an int8 zero point must (TFLite nudges it the same way).
            values = ops.reshape(inputs, (-1,))
            low, high = ((ops.min(values), ops.max(values)) if self.observing is True else
                         (ops.quantile(values, 1.0 - self.observing), ops.quantile(values, self.observing)))
            self.range_min.assign(ops.minimum(self.range_min, low))
            self.range_max.assign(ops.maximum(self.range_max, high))
            return inputs
        return keras.quantizers.fake_quant_with_min_max_vars(inputs, self.range_min, self.range_max,
                                                             num_bits=8)

    def compute_output_shape(self, input_shape):
        return input_shape


def fake_quant_kernel(kernel):
    """``kernel`` (..., C_out) rounded as TFLite stores int8 weights: per output channel (the last
    axis), symmetric, 255 levels over [−max|w|, max|w|]. Applied to the kernel in its own shape,
    which is the pattern TFLite's converter reads as the weights' quantisation."""
    bound = ops.maximum(ops.max(ops.abs(kernel), axis=tuple(range(len(kernel.shape) - 1))), 1e-12)
    return keras.quantizers.fake_quant_with_min_max_vars(kernel, -bound, bound, num_bits=8,
                                                         narrow_range=True, axis=-1)


@keras.saving.register_keras_serializable(package="mdekd")
class FakeQuantConv2D(keras.layers.Conv2D):
    """``Conv2D`` whose kernel is rounded to int8 per output channel (``fake_quant_kernel``) in
    every call: the weights the int8 TFLite model will hold (quantisation-aware fine-tuning)."""

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, fake_quant_kernel(kernel))


@keras.saving.register_keras_serializable(package="mdekd")
class FakeQuantDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """``DepthwiseConv2D`` (depth multiplier 1, channels last) whose kernel is rounded to int8 per
    channel in every call, as ``FakeQuantConv2D``."""

    def call(self, inputs):
        height, width, channels, _ = self.kernel.shape  # TFLite's depthwise weights are (1, kh, kw, C)
        kernel = ops.reshape(fake_quant_kernel(ops.reshape(self.kernel, (height, width, 1, channels))),
                             self.kernel.shape)
        outputs = ops.depthwise_conv(inputs, kernel, strides=self.strides, padding=self.padding,
                                     dilation_rate=self.dilation_rate, data_format=self.data_format)
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(outputs)
