"""Joint geometric and image-only photometric augmentation (design.md §3)."""

import numpy as np
import pytest
import tensorflow as tf

from mdekd.data.augment import augment_example, random_geometric, random_photometric

HEIGHT, WIDTH = 24, 32


def _seed(i):
    return tf.constant([i, 12345], tf.int64)


def _blocks(rng, block=4):
    """Piecewise-constant scene whose red channel encodes its depth: red = depth / 10."""
    levels = rng.integers(1, 10, (HEIGHT // block, WIDTH // block)).astype(np.float32)
    depth = np.kron(levels, np.ones((block, block), np.float32))
    image = np.stack([depth / 10, rng.random(depth.shape), np.full_like(depth, 0.5)], -1).astype(np.float32)
    return image, depth[..., None]


def test_flip_mirrors_image_and_depth_together():
    rng = np.random.default_rng(0)
    image = rng.random((HEIGHT, WIDTH, 3)).astype(np.float32)
    depth = rng.uniform(1, 40, (HEIGHT, WIDTH, 1)).astype(np.float32)  # asymmetric pattern
    seen = set()
    for i in range(12):
        out_image, out_depth = (x.numpy() for x in random_geometric(
            image, depth, _seed(i), crop_fraction=(1.0, 1.0), max_rotation_degrees=0.0))
        flipped = np.array_equal(out_image, image[:, ::-1])
        assert flipped or np.array_equal(out_image, image)
        np.testing.assert_array_equal(out_depth, depth[:, ::-1] if flipped else depth)
        seen.add(flipped)
    assert seen == {True, False}


@pytest.mark.parametrize("interpolation", ["NEAREST", "BILINEAR"])
def test_rotation_and_zoom_keep_depth_aligned_with_image(interpolation):
    image, depth = _blocks(np.random.default_rng(1))
    checked = 0
    for i in range(6):
        out_image, out_depth = (x.numpy() for x in random_geometric(
            image, depth, _seed(i), crop_fraction=(0.6, 0.9), max_rotation_degrees=5.0,
            image_interpolation=interpolation))
        predicted = out_image[..., 0] * 10  # depth the image pixel encodes
        # bilinear pixels mixing two blocks encode no single depth; compare where the code is pure
        pure = np.abs(predicted - np.round(predicted)) < 1e-4
        valid = out_depth[..., 0] > 0
        np.testing.assert_allclose(out_depth[..., 0][valid & pure], np.round(predicted)[valid & pure])
        checked += np.count_nonzero(valid & pure)
    assert checked > 0.5 * 6 * HEIGHT * WIDTH


def test_geometric_never_blends_depth_and_fills_with_zero():
    rng = np.random.default_rng(2)
    depth = rng.uniform(0.5, 40, (HEIGHT, WIDTH, 1)).astype(np.float32)
    depth[rng.random(depth.shape) < 0.3] = 0.0  # invalid holes
    image = rng.random((HEIGHT, WIDTH, 3)).astype(np.float32)
    corner_zero = []
    for i in range(6):
        _, out_depth = random_geometric(image, depth, _seed(i), crop_fraction=(1.0, 1.0), max_rotation_degrees=5.0)
        out_depth = out_depth.numpy()
        assert np.isin(out_depth, np.append(depth.ravel(), 0.0)).all()
        corner_zero.append(out_depth[0, 0, 0] == 0 or out_depth[-1, -1, 0] == 0)
    assert any(corner_zero)  # rotation uncovers corners, which must be invalid, not reflected depth


def test_zoom_does_not_rescale_depth():
    image = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    depth = np.full((HEIGHT, WIDTH, 1), 7.25, np.float32)
    _, out_depth = random_geometric(image, depth, _seed(0), crop_fraction=(0.6, 0.6), max_rotation_degrees=0.0)
    np.testing.assert_array_equal(out_depth.numpy(), depth)


def test_photometric_leaves_depth_bit_identical_and_image_in_unit_range():
    rng = np.random.default_rng(3)
    image = rng.choice([0.0, 0.02, 0.5, 0.98, 1.0], (HEIGHT, WIDTH, 3)).astype(np.float32)
    depth = rng.uniform(0, 40, (HEIGHT, WIDTH, 1)).astype(np.float32)
    changed = 0
    for i in range(8):
        out_image, out_depth = (x.numpy() for x in augment_example(image, depth, _seed(i), geometric=False))
        np.testing.assert_array_equal(out_depth, depth)
        assert out_image.min() >= 0.0 and out_image.max() <= 1.0
        changed += not np.allclose(out_image, image, atol=1e-3)
    assert changed == 8


def test_photometric_keeps_image_in_unit_range_at_extreme_settings():
    image = np.random.default_rng(4).random((HEIGHT, WIDTH, 3)).astype(np.float32)
    out = random_photometric(image, _seed(0), brightness=0.5, contrast=(0.2, 3.0), saturation=(0.0, 4.0),
                             gamma=(0.3, 3.0)).numpy()
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_same_seed_same_augmentation_different_seed_different():
    image, depth = _blocks(np.random.default_rng(5))
    a = [x.numpy() for x in augment_example(image, depth, _seed(1))]
    b = [x.numpy() for x in augment_example(image, depth, _seed(1))]
    c = [x.numpy() for x in augment_example(image, depth, _seed(2))]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_augmentation_runs_inside_dataset_map_with_static_shapes():
    image, depth = _blocks(np.random.default_rng(6))
    data = tf.data.Dataset.from_tensors((image, depth)).repeat(3)
    data = data.enumerate().map(lambda i, x: augment_example(x[0], x[1], tf.stack([i, tf.constant(0, tf.int64)])),
                                num_parallel_calls=2)
    data = data.map(lambda im, d: (tf.ensure_shape(im, [HEIGHT, WIDTH, 3]), tf.ensure_shape(d, [HEIGHT, WIDTH, 1])))
    outputs = list(data)
    assert len(outputs) == 3
    assert all(np.isin(d.numpy(), np.append(depth.ravel(), 0.0)).all() for _, d in outputs)
