"""Teacher and student maps of each distilled stride look at the same input positions (design.md §4)."""

import keras
import numpy as np
import pytest

from mdekd.distill import DISTILL_STRIDES
from mdekd.models import build_student, build_teacher, mobilenet as mobilenet_module
from mdekd.models.alignment import (alignment_offsets, cell_centres, make_kernels_point_symmetric,
                                    probe_cells)

SIZE = (128, 160, 3)
KERAS_PADDING = {name: ((0, 1), (0, 1))
                 for name in ("conv1", "conv_dw_2", "conv_dw_4", "conv_dw_6", "conv_dw_12")}


def probe_pair(encoder):
    keras.utils.set_random_seed(0)
    teacher = build_teacher(SIZE, encoder=encoder, decoder_channels=16)
    student = build_student(SIZE, alpha=0.25)
    for model in (teacher, student):
        make_kernels_point_symmetric(model)
    images = np.random.default_rng(0).uniform(size=(3, *SIZE)).astype(np.float32)
    return alignment_offsets(teacher, student, DISTILL_STRIDES, images=images)


@pytest.mark.parametrize("encoder", ["resnest14", "resnest26"])
def test_student_and_teacher_cells_are_within_half_a_cell_at_every_distilled_stride(encoder):
    offsets = probe_pair(encoder)
    for name, offset in offsets.items():
        assert offset["mean_cells"] <= 0.5, (name, offset)


def test_keras_mobilenet_padding_puts_the_stride2_map_a_cell_off(monkeypatch):
    # The probe must see the misalignment that motivated the padding table.
    monkeypatch.setattr(mobilenet_module, "STRIDE2_PADDING", KERAS_PADDING)
    offsets = probe_pair("resnest14")
    assert offsets["stride2"]["mean_cells"] > 0.8
    assert offsets["stride4"]["mean_cells"] > 0.5


def test_probe_finds_the_centre_of_a_single_convolution():
    # A 5x5 'same' convolution: cell (r, c) is centred on input pixel (r, c) exactly.
    image = keras.Input((12, 16, 3))
    conv = keras.layers.Conv2D(2, 5, padding="same")(image)
    model = keras.Model(image, {"map": conv})
    make_kernels_point_symmetric(model)
    cells = probe_cells(12, 16, count=3)
    np.testing.assert_allclose(cell_centres(model, "map", cells), np.array(cells, float), atol=1e-6)


def test_probe_sees_half_a_pixel_per_asymmetric_stride2_padding():
    image = keras.Input((16, 16, 3))
    padded = keras.layers.ZeroPadding2D(((0, 1), (0, 1)))(image)
    conv = keras.layers.Conv2D(1, 3, strides=2)(padded)  # cell i covers input 2i..2i+2: centre 2i+1
    model = keras.Model(image, {"map": conv})
    make_kernels_point_symmetric(model)
    cells = probe_cells(8, 8, count=3)
    expected = 2 * np.array(cells, float) + 1
    np.testing.assert_allclose(cell_centres(model, "map", cells), expected, atol=1e-6)
