"""Where a feature map's cells look in the input: an effective-receptive-field probe.

Two networks can output maps of the same H×W whose cells sit at different places in the image
(docs/design.md §4: stride-2 padding at the bottom/right vs symmetric, align-corners upsampling).
Distilling such a pair teaches the student positions that are off. ``cell_centres`` measures, for a
set of cells of one named output, the centroid of |∂ cell / ∂ input| — the centre of the cell's
effective receptive field — in input pixels (row, column; pixel centres at integer coordinates).
Batch-independent inference (BatchNormalization with moving statistics) lets one backward pass
probe one cell per batch element.
"""

import numpy as np
import tensorflow as tf


def probe_cells(height, width, count=6, margin=0.25):
    """``count`` cells along the map's middle row and ``count`` along its middle column, inside the
    central ``1 - 2·margin`` of each side: list of (row, column) of an (height, width) map."""
    def spread(n):
        low, high = margin * (n - 1), (1 - margin) * (n - 1)
        return sorted({int(round(v)) for v in np.linspace(low, high, count)})

    middle_row, middle_col = height // 2, width // 2
    return ([(middle_row, col) for col in spread(width)]
            + [(row, middle_col) for row in spread(height)])


def cell_centres(model, output, cells, images=None, seed=0):
    """Input-pixel centroids (row, column) of the receptive fields of ``cells`` of ``output``.

    model: functional model with dict outputs; output: key of a (B, h, w, C) map; cells: list of
    (row, column) in that map. images: (N, H, W, 3) probe inputs (default: 2 uniform random images
    in [0, 1]); the |gradient| is summed over the images' colour channels and averaged over them.
    Returns float64 (len(cells), 2).
    """
    height, width = model.input_shape[1:3]
    if images is None:
        images = np.random.default_rng(seed).uniform(size=(2, height, width, 3)).astype(np.float32)
    rows = np.arange(height, dtype=np.float64)[:, None]
    cols = np.arange(width, dtype=np.float64)[None, :]
    weight = np.zeros((len(cells), height, width))
    for image in images:
        batch = tf.convert_to_tensor(np.repeat(image[None], len(cells), axis=0))
        # one-hot selector of cell k in batch element k
        selector = np.zeros((len(cells), *model.output[output].shape[1:3], 1), np.float32)
        for k, (row, col) in enumerate(cells):
            selector[k, row, col, 0] = 1.0
        with tf.GradientTape() as tape:
            tape.watch(batch)
            features = tf.cast(model(batch, training=False)[output], tf.float32)
            objective = tf.reduce_sum(features * selector)
        gradient = tape.gradient(objective, batch).numpy()
        weight += np.abs(gradient).sum(axis=-1)
    total = weight.sum(axis=(1, 2))
    total = np.where(total > 0, total, 1.0)
    return np.stack([(weight * rows).sum(axis=(1, 2)) / total,
                     (weight * cols).sum(axis=(1, 2)) / total], axis=1)


def make_kernels_point_symmetric(model):
    """Replace every spatial kernel (rank 4, k_h or k_w > 1) of ``model`` by its average with the
    kernel rotated 180°, in place. A random kernel's own asymmetry moves a receptive-field centroid
    as much as padding does; with point-symmetric kernels only the geometry (padding, pooling,
    resampling) remains, which is what the probe is for."""
    for variable in model.weights:
        if len(variable.shape) == 4 and (variable.shape[0] > 1 or variable.shape[1] > 1):
            kernel = variable.numpy()
            variable.assign(0.5 * (kernel + kernel[::-1, ::-1]))


def alignment_offsets(teacher, student, strides, images=None, count=6):
    """Per stride name: the teacher's minus the student's receptive-field centres over the probe
    cells, in cells of that map (cells of a stride-s map are s input pixels apart): ``mean_cells``
    = |mean signed offset| per axis (the systematic shift, the larger axis), ``max_cells`` = the
    largest |offset| of a single cell. Returns dict name -> dict."""
    height = teacher.input_shape[1]
    result = {}
    for name in strides:
        h, w = teacher.output[name].shape[1:3]
        cells = probe_cells(h, w, count)
        stride = height / h
        offset = (cell_centres(teacher, name, cells, images)
                  - cell_centres(student, name, cells, images)) / stride
        result[name] = {"mean_cells": float(np.abs(offset.mean(axis=0)).max()),
                        "max_cells": float(np.abs(offset).max()), "stride": stride}
    return result
