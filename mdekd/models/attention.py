"""Attention layers of the attention students (docs/design.md §7), registered and TFLite-builtin.

- ``MultiHeadSelfAttention``: the transformer attention of MobileViT's blocks (Vaswani et al. 2017),
  applied per patch pixel over the patches: (B, P, N, d) -> (B, P, N, d).
- ``DualAttention``: the position- and channel-attention modules of the Dual Attention Network
  (Fu et al. 2019), summed onto their input: (B, H, W, C) -> (B, H, W, C).

Every op is a 3-D or 4-D MatMul / Reshape / Transpose / Softmax, which LiteRT runs as builtins
(XNNPACK takes BATCH_MATMUL and SOFTMAX). Each layer reports its own multiply-accumulates per image
(``multiply_accumulates``) so ``mdekd.models.macs`` counts it without name patterns.
"""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mdekd")
class MultiHeadSelfAttention(keras.layers.Layer):
    """Multi-head self-attention over axis 2 of (B, P, N, d): softmax(q kᵀ / √(d/h)) v, projected.

    q, k, v and the output projection are d×d with biases (PyTorch ``nn.MultiheadAttention`` /
    ml-cvnets ``MultiHeadAttention``: one d×3d ``qkv_proj`` is the three kernels side by side).
    """

    def __init__(self, num_heads, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)

    def build(self, input_shape):
        self.input_spec_shape = tuple(input_shape)  # for multiply_accumulates
        dim = input_shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"{self.name}: width {dim} is not divisible by num_heads={self.num_heads}")
        for name in ("query", "key", "value", "output"):
            setattr(self, f"{name}_kernel", self.add_weight((dim, dim), initializer="glorot_uniform",
                                                            name=f"{name}_kernel"))
            setattr(self, f"{name}_bias", self.add_weight((dim,), initializer="zeros", name=f"{name}_bias"))

    def call(self, inputs):
        _, patch_pixels, patches, dim = inputs.shape
        head_dim = dim // self.num_heads
        rows = ops.reshape(inputs, (-1, patches, dim))  # (B·P, N, d): attention is per patch pixel

        def heads(kernel, bias):  # (B·P, N, d) -> (B·P, h, N, d/h)
            x = ops.reshape(ops.matmul(rows, kernel) + bias, (-1, patches, self.num_heads, head_dim))
            return ops.transpose(x, (0, 2, 1, 3))

        query = heads(self.query_kernel, self.query_bias) * (1.0 / math.sqrt(head_dim))
        key, value = heads(self.key_kernel, self.key_bias), heads(self.value_kernel, self.value_bias)
        weights = ops.softmax(ops.matmul(query, ops.transpose(key, (0, 1, 3, 2))), axis=-1)
        attended = ops.reshape(ops.transpose(ops.matmul(weights, value), (0, 2, 1, 3)), (-1, patches, dim))
        output = ops.matmul(attended, self.output_kernel) + self.output_bias
        return ops.reshape(output, (-1, patch_pixels, patches, dim))

    def compute_output_shape(self, input_shape):
        return input_shape

    def multiply_accumulates(self):
        """Per image: four d×d projections of P·N tokens, then q kᵀ and weights·v (P·N·N·d each)."""
        _, patch_pixels, patches, dim = self.input_spec_shape
        return patch_pixels * (4 * patches * dim * dim + 2 * patches * patches * dim)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads}


@keras.saving.register_keras_serializable(package="mdekd")
class DualAttention(keras.layers.Layer):
    """x + γp·PAM(x) + γc·CAM(x) on (B, H, W, C) (Fu et al. 2019, DANet ``PAM_Module``/``CAM_Module``).

    Position attention: q, k = 1×1 convolutions to C/``reduction`` channels, v = 1×1 to C (biased);
    weights softmax over positions of q kᵀ (N×N, N = H·W); output weights·v. Channel attention:
    energy X Xᵀ (C×C) over positions, softmax of (row max − energy), output that · X. Both γ start
    at 0, as DANet's do, so a new student starts as its attention-free network (docs/design.md §7).
    """

    def __init__(self, reduction=8, **kwargs):
        super().__init__(**kwargs)
        self.reduction = int(reduction)

    def build(self, input_shape):
        self.input_spec_shape = tuple(input_shape)  # for multiply_accumulates
        channels = input_shape[-1]
        reduced = max(channels // self.reduction, 1)
        for name, width in (("query", reduced), ("key", reduced), ("value", channels)):
            setattr(self, f"{name}_kernel", self.add_weight((channels, width), initializer="glorot_uniform",
                                                            name=f"{name}_kernel"))
            setattr(self, f"{name}_bias", self.add_weight((width,), initializer="zeros", name=f"{name}_bias"))
        self.position_gamma = self.add_weight((), initializer="zeros", name="position_gamma")
        self.channel_gamma = self.add_weight((), initializer="zeros", name="channel_gamma")

    def call(self, inputs):
        _, height, width, channels = inputs.shape
        flat = ops.reshape(inputs, (-1, height * width, channels))  # (B, N, C)
        query = ops.matmul(flat, self.query_kernel) + self.query_bias
        key = ops.matmul(flat, self.key_kernel) + self.key_bias
        value = ops.matmul(flat, self.value_kernel) + self.value_bias
        position_weights = ops.softmax(ops.matmul(query, ops.transpose(key, (0, 2, 1))), axis=-1)  # (B, N, N)
        position = ops.matmul(position_weights, value)
        energy = ops.matmul(ops.transpose(flat, (0, 2, 1)), flat)  # (B, C, C)
        channel_weights = ops.softmax(ops.max(energy, axis=-1, keepdims=True) - energy, axis=-1)
        channel = ops.matmul(flat, ops.transpose(channel_weights, (0, 2, 1)))  # (B, N, C)
        attended = self.position_gamma * position + self.channel_gamma * channel
        return inputs + ops.reshape(attended, (-1, height, width, channels))

    def compute_output_shape(self, input_shape):
        return input_shape

    def multiply_accumulates(self):
        """Per image: the three projections, q kᵀ and weights·v (position), X Xᵀ and weights·X (channel)."""
        _, height, width, channels = self.input_spec_shape
        positions, reduced = height * width, max(channels // self.reduction, 1)
        projections = positions * channels * (2 * reduced + channels)
        return projections + positions * positions * (reduced + channels) + 2 * positions * channels * channels

    def get_config(self):
        return {**super().get_config(), "reduction": self.reduction}
