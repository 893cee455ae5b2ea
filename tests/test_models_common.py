"""Registered layers, MAC and parameter counting, TFLite lowering of the custom layers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdekd.constants import MIN_DEPTH
from mdekd.models import build_resnest, count_macs, cost_breakdown, cost_table, trainable_parameter_count
from mdekd.models.layers import (
    GroupedConv2D,
    PositiveDepth,
    RadixAttention,
    RadixSum,
    UpsampleBilinearAlignCorners,
)
from mdekd.models.macs import layer_macs


def _align_corners_upsample_reference(x, factor):
    """numpy bilinear resize with corner pixels aligned, (B, H, W, C) -> (B, fH, fW, C)."""

    def resize_axis(a, axis):
        n = a.shape[axis]
        positions = np.arange(n * factor) * (n - 1) / (n * factor - 1)
        low = np.floor(positions).astype(int)
        high = np.minimum(low + 1, n - 1)
        weight = (positions - low).reshape([-1 if i == axis else 1 for i in range(a.ndim)])
        return np.take(a, low, axis=axis) * (1 - weight) + np.take(a, high, axis=axis) * weight

    return resize_axis(resize_axis(x, 1), 2)


def test_align_corners_upsampling_matches_pytorch_semantics():
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype("float32")
    out = np.asarray(UpsampleBilinearAlignCorners(2)(x))
    assert out.shape == (2, 6, 10, 4)
    np.testing.assert_allclose(out, _align_corners_upsample_reference(x, 2), atol=1e-6)
    np.testing.assert_array_equal(out[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]])


def test_align_corners_upsampling_compiles_under_xla():
    x = np.random.default_rng(1).normal(size=(1, 4, 6, 2)).astype("float32")
    layer = UpsampleBilinearAlignCorners(2)
    compiled = tf.function(layer, jit_compile=True)
    np.testing.assert_allclose(compiled(x).numpy(), np.asarray(layer(x)), atol=1e-6)


def test_positive_depth_is_softplus_plus_min_depth():
    x = np.linspace(-30, 30, 601, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(PositiveDepth()(x)), np.logaddexp(0.0, x) + MIN_DEPTH, rtol=1e-6, atol=1e-7)


def test_positive_depth_stays_positive_and_finite_at_extremes():
    out = np.asarray(PositiveDepth()(np.float32([-1e30, -1e4, 1e4, 1e30])))
    np.testing.assert_allclose(out, [MIN_DEPTH, MIN_DEPTH, 1e4, 1e30], rtol=1e-6)


def test_positive_depth_gradient_is_sigmoid():
    x = tf.constant(np.float32([-8.0, -1.5, 0.25, 3.0, 12.0]))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = PositiveDepth()(x)
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), 1 / (1 + np.exp(-x.numpy())), rtol=1e-5)


def test_grouped_conv_equals_one_convolution_per_contiguous_channel_group():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 6, 7, 8)).astype("float32")
    grouped = GroupedConv2D(6, 3, padding="same", groups=2, use_bias=False)
    grouped.build(x.shape)
    kernel = rng.normal(size=(3, 3, 4, 6)).astype("float32")
    grouped.set_weights([kernel])
    expected = np.concatenate(
        [
            tf.nn.conv2d(x[..., :4], kernel[..., :3], 1, "SAME").numpy(),
            tf.nn.conv2d(x[..., 4:], kernel[..., 3:], 1, "SAME").numpy(),
        ],
        axis=-1,
    )
    np.testing.assert_allclose(np.asarray(grouped(x)), expected, atol=1e-5)


def test_radix_sum_adds_contiguous_splits():
    x = np.arange(2 * 3 * 3 * 8, dtype=np.float32).reshape(2, 3, 3, 8)
    np.testing.assert_array_equal(np.asarray(RadixSum(2)(x)), x[..., :4] + x[..., 4:])


def test_radix_attention_is_a_softmax_across_splits_per_channel():
    rng = np.random.default_rng(3)
    splits = rng.normal(size=(2, 3, 4, 10)).astype("float32")
    logits = rng.normal(size=(2, 1, 1, 10)).astype("float32") * 3
    # timm rSoftMax with cardinality 1: logit index r·C + c, softmax over r
    weights = np.exp(logits.reshape(2, 1, 1, 2, 5))
    weights /= weights.sum(axis=3, keepdims=True)
    expected = (splits.reshape(2, 3, 4, 2, 5) * weights).sum(axis=3)
    np.testing.assert_allclose(np.asarray(RadixAttention(2)([splits, logits])), expected, rtol=1e-5, atol=1e-6)


def test_custom_layers_lower_to_tflite_builtins_and_match_keras(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    image = keras.Input((8, 8, 4))
    x = GroupedConv2D(8, 3, padding="same", groups=2, name="grouped")(image)
    gap = keras.layers.GlobalAveragePooling2D(keepdims=True)(RadixSum(2)(x))
    x = RadixAttention(2)([x, keras.layers.Conv2D(8, 1)(gap)])
    x = UpsampleBilinearAlignCorners(2)(keras.layers.Conv2D(1, 1)(x))
    model = keras.Model(image, PositiveDepth(name="depth")(x))
    flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    interpreter = Interpreter(model_content=flatbuffer)
    op_names = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "RESIZE_BILINEAR" in op_names
    assert not {name for name in op_names if name.startswith("Flex") or name == "CUSTOM"}
    runner = interpreter.get_signature_runner()
    images = np.random.default_rng(4).uniform(size=(1, 8, 8, 4)).astype("float32")
    (tflite_out,) = runner(**{next(iter(runner.get_input_details())): images}).values()
    np.testing.assert_allclose(tflite_out, model.predict(images, verbose=0), atol=1e-5)


def test_layer_macs_of_plain_grouped_and_depthwise_convolutions_and_dense():
    image = keras.Input((8, 10, 4))
    plain = keras.layers.Conv2D(6, 3, padding="same")
    grouped = GroupedConv2D(6, 3, padding="same", groups=2)
    strided = keras.layers.Conv2D(6, 1, strides=2)
    depthwise = keras.layers.DepthwiseConv2D(5, padding="same", depth_multiplier=2)
    dense = keras.layers.Dense(3)
    outputs = [plain(image), grouped(image), strided(image), depthwise(image), dense(image)]
    keras.Model(image, outputs)
    assert layer_macs(plain) == 8 * 10 * 3 * 3 * 4 * 6
    assert layer_macs(grouped) == 8 * 10 * 3 * 3 * 2 * 6
    assert layer_macs(strided) == 4 * 5 * 4 * 6
    assert layer_macs(depthwise) == 8 * 10 * 5 * 5 * 8
    assert layer_macs(dense) == 8 * 10 * 4 * 3


def test_count_macs_requires_static_shapes():
    with pytest.raises(ValueError, match="fixed input size"):
        count_macs(build_resnest("resnest14"))


def test_parameter_count_excludes_moving_statistics_and_ignores_freezing():
    image = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(5, 3, use_bias=False)(image)
    model = keras.Model(image, keras.layers.BatchNormalization()(x))
    assert trainable_parameter_count(model) == 3 * 3 * 3 * 5 + 2 * 5
    model.trainable = False
    assert trainable_parameter_count(model) == 3 * 3 * 3 * 5 + 2 * 5


def test_cost_breakdown_sums_to_the_totals():
    encoder = build_resnest("resnest14", input_shape=(64, 64, 3))
    stages = cost_breakdown(encoder)
    assert list(stages) == ["stride2", "stride4", "stride8", "stride16", "stride32"]
    assert sum(p for p, _ in stages.values()) == trainable_parameter_count(encoder)
    assert sum(m for _, m in stages.values()) == count_macs(encoder)
    assert cost_table(encoder).splitlines()[-1].split()[:2] == ["total", f"{trainable_parameter_count(encoder):,}"]


def test_summary_cli_prints_stages_and_totals():
    import subprocess
    import sys

    from conftest import REPO_ROOT

    command = [sys.executable, "-m", "mdekd.models", "--summary=student", "--height=224", "--width=224"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:8]] == [f"encoder/stride{s}" for s in (2, 4, 8, 16, 32)] + ["stride32"]
    assert lines[-1].split() == ["total", "3,960,930", "0.737"]


def test_summary_cli_takes_any_registered_student_and_refuses_others():
    import subprocess
    import sys

    from conftest import REPO_ROOT

    base = [sys.executable, "-m", "mdekd.models", "--summary=student", "--height=256", "--width=256"]
    result = subprocess.run(base + ["--student_encoder=mobilevit_xs", "--decoder_attention=dual"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("student mobilevit_xs_nnconv5_dual")
    assert [line.split()[0] for line in lines[2:7]] == [f"encoder/stride{s}" for s in (2, 4, 8, 16, 32)]
    refused = subprocess.run(base + ["--student_encoder=vit_b"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--student_encoder: unknown student encoder 'vit_b'; registered: mobilenet" in refused.stderr
