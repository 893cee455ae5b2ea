"""The student registry (docs/design.md §7): every registered encoder, with and without dual
attention, builds the same named outputs, round-trips, distils and exports; MobileViT and the
attention layers equal numpy references; bad names and sizes are refused."""

import keras
import numpy as np
import pytest

from mdekd import export
from mdekd.distill import Distiller
from mdekd.models import (DECODER_ATTENTIONS, STUDENT_ENCODERS, build_student, build_teacher, count_macs,
                          trainable_parameter_count)
from mdekd.models.attention import DualAttention, MultiHeadSelfAttention
from mdekd.models.deploy import deploy_model, float_under_int8
from mdekd.models.mobilevit import MOBILEVIT_VARIANTS, LayerNorm, PatchFold, PatchUnfold, classifier_parameters

SIZE = (64, 64)
ALPHA = 0.25
MOBILEVITS = tuple(MOBILEVIT_VARIANTS)
STUDENTS = [(encoder, None) for encoder in STUDENT_ENCODERS] + [("mobilenet", "dual"), ("mobilevit_xxs", "dual")]


def tiny(encoder, attention=None, size=SIZE, seed=0):
    keras.utils.set_random_seed(seed)
    model = build_student((*size, 3), encoder=encoder, decoder_attention=attention, alpha=ALPHA)
    if attention:  # γ starts at 0 (identity); give the attention a real contribution
        layer = model.get_layer(f"decoder_{attention}_attention")
        layer.position_gamma.assign(0.7)
        layer.channel_gamma.assign(0.3)
    return model


def images(count=2, size=SIZE, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (count, *size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def teacher():
    keras.utils.set_random_seed(1)
    return build_teacher((*SIZE, 3), encoder="resnest14", decoder_channels=16)


@pytest.fixture(scope="module", params=STUDENTS, ids=lambda s: "+".join(filter(None, s)))
def student(request):
    return tiny(*request.param)


def test_registry_lists_fastdepth_and_the_three_mobilevits():
    assert list(STUDENT_ENCODERS) == ["mobilenet", "mobilevit_xxs", "mobilevit_xs", "mobilevit_s"]
    assert set(DECODER_ATTENTIONS) == {None, "dual"}


def test_every_student_has_the_teachers_stride_sizes_and_positive_depth(student, teacher):
    shapes = {key: tuple(t.shape[1:3]) for key, t in student.output.items()}
    assert shapes == {key: tuple(t.shape[1:3]) for key, t in teacher.output.items()}
    depth = student.predict(images(), verbose=0)["depth"]
    assert depth.shape == (2, *SIZE, 1) and np.all(depth > 0)


def test_every_student_round_trips_through_a_keras_file(student, tmp_path):
    path = tmp_path / "student.keras"
    student.save(path)
    loaded = keras.models.load_model(path)
    batch = images()
    expected, actual = student.predict(batch, verbose=0), loaded.predict(batch, verbose=0)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key])


def test_every_student_takes_a_distillation_step(student, teacher):
    distiller = Distiller(teacher=teacher, student=student)
    # Eager: tracing a MobileViT train step costs ~50 s on 2 cores and tests nothing more; the traced
    # step of every student runs in benchmark.ablation (docs/results/students/).
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    before = [w.numpy().copy() for w in student.trainable_weights]
    depths = np.full((2, *SIZE, 1), 3.0, np.float32)
    logs = distiller.train_on_batch(images(), depths, return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["distill_loss"] > 0
    changed = sum(not np.array_equal(a, w.numpy()) for a, w in zip(before, student.trainable_weights))
    assert changed > 0.9 * len(before)


@pytest.mark.parametrize("variant", MOBILEVITS)
def test_mobilevit_encoder_parameters_match_the_paper_with_its_classifier(variant):
    encoder = build_student((256, 256, 3), encoder=variant).get_layer("encoder")
    with_classifier = trainable_parameter_count(encoder) + classifier_parameters(variant)
    # Mehta & Rastegari 2021, Table 4: XXS 1.3 M, XS 2.3 M, S 5.6 M (rounded to 0.1 M)
    assert with_classifier / 1e6 == pytest.approx(MOBILEVIT_VARIANTS[variant].paper_parameters, abs=0.05)


def test_mobilevit_xs_encoder_macs_at_256_match_the_paper():
    encoder = build_student((256, 256, 3), encoder="mobilevit_xs").get_layer("encoder")
    assert count_macs(encoder) / 1e9 == pytest.approx(1.0, abs=0.1)  # Mehta & Rastegari 2021: 0.7-1.1 G


def test_mobilevit_student_runs_at_480x640_where_the_stride32_map_has_odd_height():
    model = build_student((480, 640, 3), encoder="mobilevit_xxs", alpha=ALPHA)
    assert tuple(model.get_layer("encoder").output["stride32"].shape[1:3]) == (15, 20)
    outputs = model.predict(images(1, (480, 640)), verbose=0)
    assert outputs["depth"].shape == (1, 480, 640, 1) and np.all(np.isfinite(outputs["depth"]))
    assert outputs["stride16"].shape[1:3] == (30, 40)


def test_patch_unfold_and_fold_are_exact_inverses():
    x = np.random.default_rng(0).normal(size=(2, 6, 8, 5)).astype(np.float32)
    patches = PatchUnfold(2)(x)
    assert tuple(patches.shape) == (2, 4, 12, 5)
    np.testing.assert_array_equal(np.asarray(PatchFold(2, 6, 8)(patches)), x)
    # patch pixel (0, 1) of patch (row 1, col 2) is input pixel (2, 5)
    np.testing.assert_array_equal(np.asarray(patches)[:, 1, 1 * 4 + 2], x[:, 2, 5])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_multi_head_self_attention_equals_a_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 6, 8)).astype(np.float32)
    layer = MultiHeadSelfAttention(2)
    layer.build(x.shape)
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape).astype(np.float32) * 0.3)
    wq, bq, wk, bk, wv, bv, wo, bo = (w.numpy() for w in layer.weights)
    heads = lambda t: t.reshape(2, 4, 6, 2, 4).transpose(0, 1, 3, 2, 4)  # noqa: E731  (b, p, h, n, dh)
    q, k, v = heads(x @ wq + bq), heads(x @ wk + bk), heads(x @ wv + bv)
    attended = _softmax(q @ k.swapaxes(-1, -2) / np.sqrt(4)) @ v
    expected = attended.transpose(0, 1, 3, 2, 4).reshape(2, 4, 6, 8) @ wo + bo
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-4, atol=1e-5)
    assert layer.multiply_accumulates() == 4 * (4 * 6 * 8 * 8 + 2 * 6 * 6 * 8)


def test_dual_attention_equals_a_numpy_reference_of_danet():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4, 16)).astype(np.float32)
    layer = DualAttention(reduction=8)
    layer.build(x.shape)
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape).astype(np.float32) * 0.2)
    wq, bq, wk, bk, wv, bv, gamma_p, gamma_c = (w.numpy() for w in layer.weights)
    flat = x.reshape(2, 12, 16)  # (B, N, C)
    # DANet PAM_Module in (B, C, N) form: out = V · softmax(Qᵀ K)ᵀ
    q, k, v = (np.swapaxes(flat @ w + b, 1, 2) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    pam = v @ np.swapaxes(_softmax(np.swapaxes(q, 1, 2) @ k), 1, 2)
    # DANet CAM_Module: energy = X Xᵀ, softmax(max − energy) · X
    channels = np.swapaxes(flat, 1, 2)
    energy = channels @ flat
    cam = _softmax(energy.max(-1, keepdims=True) - energy) @ channels
    expected = x + (gamma_p * pam + gamma_c * cam).swapaxes(1, 2).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-4, atol=1e-4)


def test_dual_attention_starts_as_the_identity():
    x = np.random.default_rng(2).normal(size=(1, 2, 2, 8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(DualAttention()(x)), x)


def test_int8_export_of_an_attention_student_passes_verification():
    # One student stands for all: the MobileViT variants differ only in their rows of the
    # configuration table, and every registered student in every mode is exported by
    # benchmark.export_students (docs/results/students/export_students.md, 32/32 verified).
    model = tiny("mobilevit_xxs", "dual")
    calibration = list(images(3, seed=5))
    tflite = export.convert(model, "int8", calibration)
    ops = export.list_ops(tflite)
    assert ops.get("BATCH_MATMUL", 0) > 0 and export.forbidden_ops(ops) == []
    # float islands: only the attention layers (int8 BATCH_MATMUL is slow, docs/toolchain.md §23),
    # 9 transformers' and the dual attention, plus the output tail; the LayerNorms stay int8 (§22)
    float_layers = float_under_int8(deploy_model(model))
    assert len(float_layers) == 10 and all("attention" in name for name in float_layers)
    assert (ops["QUANTIZE"], ops["DEQUANTIZE"]) == (1 + 10, 10 + 1)
    assert export.verify(tflite, model, images(2, seed=6), mode="int8", num_threads=1)["passed"]
    assert export.gpu_delegate_compatibility(tflite)["compatible"]


def test_mobilevit_layer_norm_equals_keras_layer_normalization():
    x = np.random.default_rng(3).normal(2.0, 3.0, (2, 4, 6, 8)).astype(np.float32)
    gamma, beta = np.linspace(0.5, 1.5, 8), np.linspace(-1, 1, 8)
    ours, reference = LayerNorm(epsilon=1e-5), keras.layers.LayerNormalization(epsilon=1e-5)
    for layer in (ours, reference):
        layer.build(x.shape)
        layer.set_weights([gamma, beta])
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(reference(x)), rtol=1e-5, atol=1e-5)


def test_unknown_encoder_lists_the_registered_ones():
    with pytest.raises(ValueError, match="mobilevit_xs, mobilevit_s"):
        build_student((64, 64, 3), encoder="efficientnet")


def test_unknown_attention_lists_the_registered_ones():
    with pytest.raises(ValueError, match="registered: dual"):
        build_student((64, 64, 3), decoder_attention="axial")


def test_attention_student_refuses_a_size_that_is_not_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        build_student((100, 64, 3), encoder="mobilevit_xs")


def test_cost_breakdown_puts_mobilevit_patch_layers_in_their_map_stride():
    from mdekd.models import cost_breakdown

    model = build_student((128, 160, 3), encoder="mobilevit_xxs", alpha=ALPHA)
    stages = list(cost_breakdown(model))
    assert [s for s in stages if s.startswith("encoder/")] == [
        "encoder/stride2", "encoder/stride4", "encoder/stride8", "encoder/stride16", "encoder/stride32"]
    assert sum(p for p, _ in cost_breakdown(model).values()) == trainable_parameter_count(model)
