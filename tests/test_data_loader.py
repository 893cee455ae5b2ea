"""Pair listing, PNG decoding and the tf.data pipeline (design.md §3), on tiny files written with PIL."""

import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mdekd.constants import MAX_DEPTH
from mdekd.data import build_dataset, check_pairs, list_pairs, num_examples, read_depth_png, read_rgb

HEIGHT, WIDTH = 6, 8


def _save(array, path):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _random_rgb(rng, height=HEIGHT, width=WIDTH):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _random_depth(rng, height=HEIGHT, width=WIDTH, high=39_000):
    return rng.integers(0, high, (height, width), dtype=np.uint16)


def _make_mai2021(root, count=3, split="train", seed=0, height=HEIGHT, width=WIDTH):
    """MAI2021 layout with random 8-bit RGB and uint16 millimetre depth; returns the arrays by name."""
    rng = np.random.default_rng(seed)
    frames = {}
    for index in range(count):
        name = f"{index:04d}"
        rgb, depth = _random_rgb(rng, height, width), _random_depth(rng, height, width)
        _save(rgb, root / split / "rgb" / f"{name}.png")
        _save(depth, root / split / "depth" / f"{name}.png")
        frames[name] = (rgb, depth)
    return frames


def _batches(dataset):
    return [(image.numpy(), depth.numpy()) for image, depth in dataset]


# ------------------------------------------------------------------ listing and numpy readers

def test_list_pairs_mai2021_pairs_by_stem_sorted(tmp_path):
    _make_mai2021(tmp_path, count=3)
    pairs = list_pairs(tmp_path, "train", "mai2021")
    assert [(pathlib.Path(r).name, pathlib.Path(d).name) for r, d in pairs] == [
        ("0000.png", "0000.png"), ("0001.png", "0001.png"), ("0002.png", "0002.png")]
    assert all(pathlib.Path(r).parent.name == "rgb" and pathlib.Path(d).parent.name == "depth" for r, d in pairs)
    assert num_examples(tmp_path, "train") == 3


def test_read_depth_png_gives_millimetres_over_1000_exactly(tmp_path):
    millimetres = np.array([[0, 1, 255, 256], [1234, 39_999, 40_000, 65_535]], np.uint16)
    depth = read_depth_png(_save(millimetres, tmp_path / "d.png"), 1e-3)
    assert depth.shape == (2, 4, 1) and depth.dtype == np.float32
    np.testing.assert_array_equal(depth[..., 0], millimetres.astype(np.float32) / np.float32(1000))


def test_read_rgb_gives_float_in_unit_range_exactly(tmp_path):
    rgb = _random_rgb(np.random.default_rng(1))
    image = read_rgb(_save(rgb, tmp_path / "i.png"))
    assert image.dtype == np.float32 and image.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(image, rgb.astype(np.float32) / np.float32(255))


# ------------------------------------------------------------------ tf.data round trips

def test_build_dataset_round_trip_is_bit_exact(tmp_path):
    frames = _make_mai2021(tmp_path, count=3)
    batches = _batches(build_dataset(tmp_path, "train", batch_size=3, shuffle=False, max_depth=None))
    assert len(batches) == 1
    images, depths = batches[0]
    for i, (rgb, millimetres) in enumerate(frames.values()):
        np.testing.assert_array_equal(images[i], rgb.astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(depths[i, ..., 0], millimetres.astype(np.float32) / np.float32(1000))


def test_uint16_depth_above_255_survives_decoding(tmp_path):
    # the default uint8 decode_png would return 1234 >> 8 = 4, i.e. 0.004 m
    millimetres = np.full((HEIGHT, WIDTH), 1234, np.uint16)
    _save(_random_rgb(np.random.default_rng(0)), tmp_path / "train" / "rgb" / "a.png")
    _save(millimetres, tmp_path / "train" / "depth" / "a.png")
    (_, depth), = _batches(build_dataset(tmp_path, "train", batch_size=1))
    assert np.all(depth == np.float32(1.234))


def test_depth_outside_valid_range_becomes_zero(tmp_path):
    millimetres = np.array([[0, 1, 2, 40_000, 40_001, 65_535, 5_000, 10]], np.uint16)
    _save(np.zeros((1, 8, 3), np.uint8), tmp_path / "train" / "rgb" / "a.png")
    _save(millimetres, tmp_path / "train" / "depth" / "a.png")
    (_, depth), = _batches(build_dataset(tmp_path, "train", batch_size=1, max_depth=MAX_DEPTH))
    # valid: MIN_DEPTH (1 mm) < d <= 40 m
    np.testing.assert_array_equal(depth[0, 0, :, 0], np.float32([0, 0, 0.002, 40, 0, 0, 5, 0.01]))


def test_kitti_layout_divides_by_256_through_nested_folders(tmp_path):
    rng = np.random.default_rng(2)
    drive = "2011_09_26_drive_0001_sync/image_02"
    stored = {}
    for frame in ("0000000005", "0000000006"):
        stored[frame] = _random_depth(rng, high=10_000)
        _save(_random_rgb(rng), tmp_path / "train" / "rgb" / drive / f"{frame}.png")
        _save(stored[frame], tmp_path / "train" / "depth" / drive / f"{frame}.png")
    pairs = list_pairs(tmp_path, "train", "kitti")
    assert [pathlib.Path(r).relative_to(tmp_path / "train" / "rgb").as_posix() for r, _ in pairs] == [
        f"{drive}/0000000005.png", f"{drive}/0000000006.png"]
    batches = _batches(build_dataset(tmp_path, "train", "kitti", batch_size=2, shuffle=False))
    expected = np.stack([stored["0000000005"], stored["0000000006"]]).astype(np.float32) / np.float32(256)
    np.testing.assert_array_equal(batches[0][1][..., 0], expected)


def test_nyu_bts_layout_pairs_prefixed_files_in_scene_folders(tmp_path):
    rng = np.random.default_rng(3)
    stored = {}
    for scene, index in (("bathroom", "00045"), ("kitchen", "00007"), ("kitchen", "00012")):
        folder = tmp_path / "sync" / scene
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_random_rgb(rng)).save(folder / f"rgb_{index}.jpg", quality=95)
        stored[(scene, index)] = _random_depth(rng, high=10_000)
        _save(stored[(scene, index)], folder / f"sync_depth_{index}.png")
    pairs = list_pairs(tmp_path, "sync", "nyu")
    assert [(pathlib.Path(r).name, pathlib.Path(d).name) for r, d in pairs] == [
        ("rgb_00045.jpg", "sync_depth_00045.png"), ("rgb_00007.jpg", "sync_depth_00007.png"),
        ("rgb_00012.jpg", "sync_depth_00012.png")]
    images, depths = _batches(build_dataset(tmp_path, "sync", "nyu", batch_size=3, shuffle=False))[0]
    expected = np.stack(list(stored.values())).astype(np.float32) / np.float32(1000)
    np.testing.assert_array_equal(depths[..., 0], expected)
    # both readers use libjpeg's accurate integer IDCT; allow one grey level for library versions
    np.testing.assert_allclose(images[0], read_rgb(pairs[0][0]), atol=1 / 255 + 1e-6)


def test_generic_folder_layout_uses_given_depth_scale_and_prefixes(tmp_path):
    rng = np.random.default_rng(4)
    depth = _random_depth(rng, high=1000)
    _save(_random_rgb(rng), tmp_path / "val" / "frames" / "img_a.png")
    _save(depth, tmp_path / "val" / "frames" / "depth_a.png")
    dataset = build_dataset(tmp_path, "val", "folder", batch_size=1, depth_scale=0.01, rgb_dir="frames",
                            depth_dir="frames", rgb_prefix="img_", depth_prefix="depth_")
    (_, decoded), = _batches(dataset)
    np.testing.assert_array_equal(decoded[0, ..., 0], depth.astype(np.float32) / np.float32(100))


def test_synthetic_is_the_mai2021_layout(tmp_path):
    _make_mai2021(tmp_path, count=2)
    assert list_pairs(tmp_path, "train", "synthetic") == list_pairs(tmp_path, "train", "mai2021")


def test_static_shapes_and_resize_keeps_only_stored_depth_values(tmp_path):
    frames = _make_mai2021(tmp_path, count=2)
    dataset = build_dataset(tmp_path, "train", batch_size=2, image_size=(4, 4), shuffle=True)
    assert dataset.element_spec[0].shape.as_list() == [2, 4, 4, 3]
    assert dataset.element_spec[1].shape.as_list() == [2, 4, 4, 1]
    images, depths = _batches(dataset)[0]
    stored = np.concatenate([d.ravel() for _, d in frames.values()]).astype(np.float32) / np.float32(1000)
    assert np.isin(depths, np.append(stored, 0)).all()  # nearest resampling never invents depths
    assert images.min() >= 0 and images.max() <= 1


def test_stored_size_is_static_without_image_size(tmp_path):
    _make_mai2021(tmp_path, count=3)
    dataset = build_dataset(tmp_path, "train", batch_size=2, shuffle=False)
    assert dataset.element_spec[0].shape.as_list() == [None, HEIGHT, WIDTH, 3]  # last batch kept


# ------------------------------------------------------------------ determinism

def test_same_seed_gives_same_batches(tmp_path):
    _make_mai2021(tmp_path, count=5)

    def take(seed):
        dataset = build_dataset(tmp_path, "train", batch_size=2, augment=True, repeat=True, seed=seed)
        return _batches(dataset.take(5))
    first = take(7)
    tf.random.set_seed(1234)  # the pipeline's randomness must not depend on TF's global seed
    second, other = take(7), take(8)
    for (image_a, depth_a), (image_b, depth_b) in zip(first, second):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(depth_a, depth_b)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_each_epoch_is_a_new_permutation_of_all_pairs(tmp_path):
    frames = _make_mai2021(tmp_path, count=6)
    dataset = build_dataset(tmp_path, "train", batch_size=1, shuffle=True, repeat=True, seed=0, max_depth=None)
    depths = [d for _, d in _batches(dataset.take(12))]
    names = list(frames)
    metres = {n: depth.astype(np.float32) / np.float32(1000) for n, (_, depth) in frames.items()}

    def order(epoch):
        return [next(n for n in names if np.array_equal(d[0, ..., 0], metres[n])) for d in epoch]

    first, second = order(depths[:6]), order(depths[6:])
    assert sorted(first) == sorted(second) == names
    assert first != second


def test_validation_split_is_not_shuffled_by_default(tmp_path):
    frames = _make_mai2021(tmp_path, count=3, split="validation")
    _, depths = _batches(build_dataset(tmp_path, "validation", batch_size=3, max_depth=None))[0]
    expected = np.stack([d for _, d in frames.values()]).astype(np.float32) / np.float32(1000)
    np.testing.assert_array_equal(depths[..., 0], expected)


# ------------------------------------------------------------------ bad inputs name the file or flag

def test_missing_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset root not found: .*nowhere"):
        list_pairs(tmp_path / "nowhere")


def test_missing_split_folder_is_named(tmp_path):
    _make_mai2021(tmp_path, count=1)
    with pytest.raises(FileNotFoundError, match=r"split folder not found: .*validation.*train"):
        list_pairs(tmp_path, "validation")


def test_rgb_without_depth_is_named(tmp_path):
    _make_mai2021(tmp_path, count=2)
    _save(_random_rgb(np.random.default_rng(0)), tmp_path / "train" / "rgb" / "lonely.png")
    with pytest.raises(ValueError, match=r"1 RGB file\(s\) have no depth file.*lonely\.png"):
        list_pairs(tmp_path)


def test_depth_without_rgb_is_named_and_counted(tmp_path):
    _make_mai2021(tmp_path, count=1)
    for index in range(7):
        _save(_random_depth(np.random.default_rng(index)), tmp_path / "train" / "depth" / f"orphan{index}.png")
    with pytest.raises(ValueError, match=r"7 depth file\(s\) have no RGB file.*orphan0\.png.*and 2 more"):
        list_pairs(tmp_path)


def test_allow_unpaired_drops_unpaired_files(tmp_path):
    _make_mai2021(tmp_path, count=2)
    _save(_random_rgb(np.random.default_rng(0)), tmp_path / "train" / "rgb" / "lonely.png")
    assert len(list_pairs(tmp_path, allow_unpaired=True)) == 2


def test_8bit_depth_png_is_rejected_with_file_and_mode(tmp_path):
    _make_mai2021(tmp_path, count=2)
    bad = _save(np.full((HEIGHT, WIDTH), 200, np.uint8), tmp_path / "train" / "depth" / "0001.png")
    with pytest.raises(ValueError, match=rf"{bad}.*16-bit.*mode 'L' \(8-bit grayscale\)"):
        build_dataset(tmp_path, "train")
    with pytest.raises(ValueError, match=r"0001\.png.*mode 'L'"):
        read_depth_png(bad, 1e-3)


def test_rgb_depth_png_is_rejected_with_file_and_mode(tmp_path):
    _make_mai2021(tmp_path, count=1)
    bad = _save(_random_rgb(np.random.default_rng(0)), tmp_path / "train" / "depth" / "0000.png")
    with pytest.raises(ValueError, match=rf"{bad}.*mode 'RGB'"):
        build_dataset(tmp_path, "train")


def test_size_mismatch_names_both_files(tmp_path):
    _make_mai2021(tmp_path, count=2)
    _save(_random_depth(np.random.default_rng(0), height=HEIGHT + 1), tmp_path / "train" / "depth" / "0001.png")
    with pytest.raises(ValueError, match=r"size mismatch: RGB .*rgb/0001\.png is 8x6.*depth/0001\.png is 8x7"):
        build_dataset(tmp_path, "train")


def test_size_mismatch_is_caught_in_the_pipeline_without_validation(tmp_path):
    _make_mai2021(tmp_path, count=1)
    _save(_random_depth(np.random.default_rng(0), height=HEIGHT + 1), tmp_path / "train" / "depth" / "0000.png")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"sizes .* differ.*rgb/0000\.png"):
        _batches(build_dataset(tmp_path, "train", batch_size=1, validate="none"))


def test_corrupt_png_is_named(tmp_path):
    _make_mai2021(tmp_path, count=2)
    bad = tmp_path / "train" / "rgb" / "0001.png"
    bad.write_bytes(b"this is not a PNG at all")
    with pytest.raises(ValueError, match=rf"cannot read image file {bad}"):
        build_dataset(tmp_path, "train")
    with pytest.raises(ValueError, match=rf"cannot read image file {bad}"):
        read_rgb(bad)


def test_truncated_png_is_named_by_full_validation_and_numpy_reader(tmp_path):
    _make_mai2021(tmp_path, count=1, height=64, width=64)
    bad = tmp_path / "train" / "depth" / "0000.png"
    bad.write_bytes(bad.read_bytes()[:-200])
    with pytest.raises(ValueError, match=rf"corrupt image file {bad}"):
        check_pairs(list_pairs(tmp_path), full=True)
    with pytest.raises(ValueError, match=rf"cannot decode image file {bad}"):
        read_depth_png(bad, 1e-3)


def test_empty_dataset_is_reported(tmp_path):
    (tmp_path / "train" / "rgb").mkdir(parents=True)
    (tmp_path / "train" / "depth").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no RGB/depth pairs found in .*train"):
        list_pairs(tmp_path)


def test_unknown_dataset_lists_known_ones(tmp_path):
    known = "folder, kitti, mai2021, nyu, synthetic"
    with pytest.raises(ValueError, match=rf"unknown dataset 'mai2022'; known datasets: {known}"):
        list_pairs(tmp_path, dataset="mai2022")


def test_unknown_layout_option_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"unknown layout option\(s\) rgb_folder"):
        list_pairs(tmp_path, rgb_folder="x")


def test_folder_layout_without_depth_scale_names_the_flag(tmp_path):
    _make_mai2021(tmp_path, count=1)
    with pytest.raises(ValueError, match=r"dataset 'folder' needs depth_scale="):
        build_dataset(tmp_path, "train", "folder")


def test_fewer_pairs_than_a_dropped_batch_is_an_error(tmp_path):
    _make_mai2021(tmp_path, count=3)
    with pytest.raises(ValueError, match=r"has 3 pair\(s\), fewer than batch_size=8"):
        build_dataset(tmp_path, "train", batch_size=8)


def test_mixed_sizes_without_image_size_ask_for_it(tmp_path):
    _make_mai2021(tmp_path, count=1)
    rng = np.random.default_rng(0)
    _save(_random_rgb(rng, 4, 4), tmp_path / "train" / "rgb" / "small.png")
    _save(_random_depth(rng, 4, 4), tmp_path / "train" / "depth" / "small.png")
    with pytest.raises(ValueError, match=r"2 different sizes.*image_size"):
        build_dataset(tmp_path, "train", batch_size=2)
    assert build_dataset(tmp_path, "train", batch_size=2, image_size=(4, 4)).element_spec[0].shape[1:3] == (4, 4)
