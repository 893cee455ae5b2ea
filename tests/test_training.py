"""train.py end to end: outputs, bad input, resume after kill -9, tf.distribute equivalence."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Quickstart flagfiles, shrunk to a tiny run: 64x64, α=0.25 student, ResNeSt-14 teacher of width 16.
TINY = ["--height=64", "--width=64", "--batch_size=2", "--student_alpha=0.25",
        "--teacher_encoder=resnest14", "--teacher_decoder_channels=16", "--epochs=2",
        "--steps_per_epoch=2", "--synthetic_train=6", "--synthetic_validation=2"]


def run_train(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from mdekd.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("data") / "scenes"
    generate_dataset(root, train=6, validation=2, height=64, width=64, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def teacher_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    result = run_train("--flagfile=configs/quickstart_teacher.cfg", *TINY,
                       f"--data_dir={data_dir}", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_quickstart_teacher_run_writes_every_output(teacher_run):
    for name in ("best.keras", "last.keras", "run.json", "flags.txt", "metrics.csv", "best.json"):
        assert (teacher_run / name).is_file(), name
    assert any((teacher_run / "tensorboard").rglob("events.out.tfevents.*"))
    assert list((teacher_run / "tensorboard" / "images").glob("events.out.tfevents.*"))
    rows = (teacher_run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 and "val_si_rmse" in rows[0]
    assert json.loads((teacher_run / "run.json").read_text())["mode"] == "teacher"
    assert "--mode=teacher" in (teacher_run / "flags.txt").read_text()


def test_saved_network_is_the_teacher_not_the_trainer(teacher_run):
    import mdekd.models  # noqa: F401  (registers the custom layers)

    model = keras.models.load_model(teacher_run / "best.keras", compile=False)
    assert set(model.output) == {"depth", "stride16", "stride8", "stride4", "stride2"}
    assert tuple(model.input_shape[1:]) == (64, 64, 3)


def test_quickstart_distillation_run_writes_the_student(teacher_run, data_dir, tmp_path):
    out = tmp_path / "distill"
    result = run_train("--flagfile=configs/quickstart_distill.cfg", *TINY,
                       f"--teacher={teacher_run / 'best.keras'}", f"--data_dir={data_dir}",
                       f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    import mdekd.models  # noqa: F401

    student = keras.models.load_model(out / "last.keras", compile=False)
    assert student.name.startswith("fastdepth")
    assert "distill_loss" in (out / "metrics.csv").read_text().splitlines()[0]


def tiny_config(tmp_path, **changes):
    from mdekd.train_config import TrainConfig

    base = dict(height=64, width=64, batch_size=2, student_alpha=0.25, teacher_encoder="resnest14",
                teacher_decoder_channels=16, epochs=2, steps_per_epoch=2,
                output_dir=str(tmp_path / "run"))
    return TrainConfig(**{**base, **changes})


def test_distill_without_teacher_is_refused(tmp_path):
    from mdekd.train_config import validate_config

    with pytest.raises(ValueError, match="--mode=distill needs --teacher"):
        validate_config(tiny_config(tmp_path, mode="distill", teacher=""))


def test_teacher_of_another_input_size_is_refused(teacher_run, tmp_path):
    from mdekd.training import load_teacher

    config = tiny_config(tmp_path, mode="distill", height=96, teacher=str(teacher_run / "best.keras"))
    with pytest.raises(ValueError, match=r"--teacher: .* built for input H×W \(64, 64\)"):
        load_teacher(config)


def test_unknown_distilled_stride_is_refused(teacher_run, tmp_path):
    from mdekd.train_config import validate_config

    config = tiny_config(tmp_path, mode="distill", teacher=str(teacher_run / "best.keras"),
                         distill_strides=("stride8", "stride3"))
    with pytest.raises(ValueError, match="--distill_strides"):
        validate_config(config)


def test_unknown_student_encoder_and_attention_are_refused_naming_the_flag(tmp_path):
    from mdekd.train_config import validate_config

    with pytest.raises(ValueError, match="--student_encoder: .*'vgg'; registered: mobilenet, mobilevit_xxs"):
        validate_config(tiny_config(tmp_path, student_encoder="vgg"))
    with pytest.raises(ValueError, match="--decoder_attention: .*'axial'; registered: dual"):
        validate_config(tiny_config(tmp_path, decoder_attention="axial"))


def test_student_encoder_and_attention_choose_the_network_trained(tmp_path):
    from mdekd.training import build_network

    network, rebuild = build_network(tiny_config(tmp_path, student_encoder="mobilevit_xxs", decoder_attention="dual"))
    assert network.name == rebuild().name == "mobilevit_xxs_nnconv5_dual"
    assert network.get_layer("decoder_dual_attention") is not None


def test_unknown_mode_and_unknown_flag_are_refused_by_the_cli():
    result = run_train("--mode=pupil")
    assert result.returncode != 0 and "--mode" in result.stderr
    result = run_train("--no_such_flag=1")
    assert result.returncode != 0 and "no_such_flag" in result.stderr


def test_missing_dataset_is_refused(tmp_path):
    from mdekd.training import ensure_dataset

    config = tiny_config(tmp_path, dataset="mai2021", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="--data_dir: .*nowhere"):
        ensure_dataset(config)


def test_unwritable_output_dir_is_refused(tmp_path):
    from mdekd.run_folder import prepare_output_dir

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # As root, permissions are not enforced: /proc refuses new entries for everyone.
    target = locked / "run" if not os.access(locked, os.W_OK) else pathlib.Path("/proc/mdekd_run")
    with pytest.raises(PermissionError, match="--output_dir: cannot write"):
        prepare_output_dir(target)


def test_training_errors_reach_the_user_as_one_line(data_dir, tmp_path):
    result = run_train("--mode=student", *TINY, f"--data_dir={data_dir}",
                       "--output_dir=/proc/mdekd_run")
    assert result.returncode == 1
    assert "train.py: error: --output_dir: cannot write" in result.stderr
    assert "Traceback" not in result.stderr


def test_nan_loss_stops_the_cli_naming_the_step_and_the_terms(data_dir, tmp_path):
    # A learning rate of 1e30 makes the second step's loss non-finite.
    result = run_train("--mode=student", *TINY, "--learning_rate=1e30", "--schedule=cosine",
                       f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'nan'}")
    assert result.returncode == 1
    assert "non-finite loss at training step 2 (epoch 1, batch 2)" in result.stderr
    assert "si_loss=" in result.stderr and "gml_loss=" in result.stderr


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path):
    from mdekd.distill import DepthTrainer
    from mdekd.models import build_student
    from mdekd.callbacks import NetworkCheckpoint, NonFiniteLossError, StopOnNonFiniteLoss

    student = build_student((64, 64, 3), alpha=0.25)
    trainer = DepthTrainer(student)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = np.random.default_rng(0).uniform(0, 1, (4, 64, 64, 3)).astype(np.float32)
    depths = np.full((4, 64, 64, 1), 5.0, np.float32)
    checkpoint = NetworkCheckpoint(student, tmp_path)
    callbacks = [StopOnNonFiniteLoss(2, checkpoint), checkpoint]
    trainer.fit(images, depths, batch_size=2, epochs=1, callbacks=callbacks, verbose=0)
    good = [w.copy() for w in student.get_weights()]
    poisoned = student.trainable_weights[-1]
    poisoned.assign(np.full(poisoned.shape, np.nan, np.float32))
    with pytest.raises(NonFiniteLossError, match="training step 3 .epoch 2, batch 1."):
        trainer.fit(images, depths, batch_size=2, epochs=2, initial_epoch=1,
                    callbacks=callbacks, verbose=0)
    saved = keras.models.load_model(tmp_path / "last.keras", compile=False).get_weights()
    for expected, found in zip(good, saved):
        np.testing.assert_array_equal(expected, found)


def test_killed_run_resumes_from_its_last_epoch(data_dir, tmp_path):
    out = tmp_path / "resume"
    args = [sys.executable, "train.py", "--mode=student", *TINY, "--epochs=4",
            f"--data_dir={data_dir}", f"--output_dir={out}"]
    process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metadata = out / "backup" / "training_metadata.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metadata.exists() and json.loads(metadata.read_text() or "{}").get("epoch", 0) >= 1:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = json.loads(metadata.read_text())["epoch"]
    assert 1 <= done_before < 4

    result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(metadata.read_text())["epoch"] == 4
    epochs = [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    # Every epoch was completed by one of the two runs; none was lost.
    assert sorted({int(e) for e in epochs}) == [0, 1, 2, 3]


def mirrored_weights(variant, tmp_path):
    out = tmp_path / f"{variant}.npz"
    result = subprocess.run([sys.executable, "tests/distributed_run.py", variant, str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = np.load(out)
    return weights["initial"], weights["replicas1"], weights["replicas2"]


def test_mirrored_two_replicas_give_the_one_device_update(tmp_path):
    initial, one, two = mirrored_weights("frozen_bn", tmp_path)
    moved = np.abs(one - initial).max()
    assert moved > 1e-5  # training did change the weights
    # Unscaled per-replica losses would make the 2-replica update twice as large.
    assert np.abs(one - two).max() < 1e-3 * moved


def test_mirrored_synchronised_batch_norm_stays_close_to_one_device(tmp_path):
    # Training-mode BN couples the samples of a batch. With synchronised moments 2 replicas follow
    # 1 device closely (measured: cosine 0.96, norm ratio 0.994 after 2 steps; the gradient
    # through the cross-replica all-reduce is not bit-exact), not exactly.
    initial, one, two = mirrored_weights("sync_bn", tmp_path)
    update_one, update_two = one - initial, two - initial
    cosine = update_one @ update_two / np.linalg.norm(update_one) / np.linalg.norm(update_two)
    assert cosine > 0.9
    assert np.linalg.norm(update_two) == pytest.approx(np.linalg.norm(update_one), rel=0.05)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _train_two_workers(data_dir, out, tmp_path, *flags):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes, logs = [], []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        # Output to files: a full pipe would block one worker and, through the collectives, both.
        logs.append(open(tmp_path / f"worker{index}.log", "w+"))
        processes.append(subprocess.Popen(
            [sys.executable, "train.py", "--mode=student", *TINY, "--distribution=multi_worker",
             f"--data_dir={data_dir}", f"--output_dir={out}", *flags],
            cwd=REPO_ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        for p in processes:
            p.wait(timeout=300)
    finally:
        for p in processes:
            p.kill()
    for p, log in zip(processes, logs):
        log.seek(0)
        assert p.returncode == 0, log.read()[-3000:]


def test_two_workers_on_loopback_resume_and_end_with_identical_weights(data_dir, tmp_path):
    out = tmp_path / "multi"
    _train_two_workers(data_dir, out, tmp_path, "--epochs=1")
    assert json.loads((out / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    _train_two_workers(data_dir, out, tmp_path, "--epochs=2")  # as after an interruption
    import mdekd.models  # noqa: F401

    for folder in (out, out / "worker1"):
        assert json.loads((folder / "backup" / "training_metadata.json").read_text())["epoch"] == 2
        epochs = [line.split(",")[0] for line in (folder / "metrics.csv").read_text().splitlines()[1:]]
        assert epochs == ["0", "1"]  # the second run trained epoch 1 only: it resumed
        assert "val_si_rmse" in (folder / "metrics.csv").read_text().splitlines()[0]
    chief = keras.models.load_model(out / "last.keras", compile=False).get_weights()
    other = keras.models.load_model(out / "worker1" / "last.keras", compile=False).get_weights()
    for a, b in zip(chief, other):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Unlabelled photos, response distillation, cached targets


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    for index, size in enumerate([(40, 52), (90, 70), (64, 64), (33, 47), (80, 100)]):
        folder = root / ("deep" if index % 2 else "")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"p{index}.jpg")
    return root


def distill_config(tmp_path, teacher_run, data_dir, photos, **changes):
    base = dict(mode="distill", teacher=str(teacher_run / "best.keras"), dataset="synthetic",
                data_dir=str(data_dir), batch_size=4, unlabeled_dir=str(photos),
                unlabeled_ratio=0.5, augment=False)
    return tiny_config(tmp_path, **{**base, **changes})


def mixed_batches(config, count=4):
    from mdekd import training

    network, _ = training.build_network(config)
    trainer = training.build_trainer(config, network)
    ds = training._training_dataset(config, pathlib.Path(config.data_dir), tmp_dir(config), trainer)
    return trainer, list(ds.take(count))


def tmp_dir(config):
    path = pathlib.Path(config.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_mixed_batches_hold_exactly_the_asked_share_of_unlabelled_frames(teacher_run, data_dir, photos, tmp_path):
    _, batches = mixed_batches(distill_config(tmp_path, teacher_run, data_dir, photos, batch_size=4,
                                              unlabeled_ratio=0.75))
    for images, depths in batches:
        assert images.shape == (4, 64, 64, 3)
        labelled = np.any(depths.numpy() > 0, axis=(1, 2, 3))
        assert labelled.tolist() == [True, False, False, False]


def test_cached_targets_equal_the_live_teacher_on_labelled_and_unlabelled_frames(teacher_run, data_dir, photos, tmp_path):
    config = distill_config(tmp_path, teacher_run, data_dir, photos, teacher_cache=True,
                            lambda_response=1.0, pool_scale=None)
    trainer, batches = mixed_batches(config, count=2)
    for inputs, _ in batches:
        assert set(inputs) == {"image", "stride16", "stride8", "stride4", "stride2", "teacher_depth"}
        live = trainer.teacher_targets(inputs["image"])
        for name, value in live.items():
            np.testing.assert_allclose(inputs[name].numpy(), value.numpy(), atol=1e-4, err_msg=name)


@pytest.mark.parametrize("changes, message", [
    (dict(unlabeled_ratio=1.0), r"--unlabeled_ratio: expected a fraction in \[0, 1\)"),
    (dict(unlabeled_ratio=-0.25), r"--unlabeled_ratio: expected a fraction in \[0, 1\)"),
    (dict(unlabeled_ratio=0.3), r"--unlabeled_ratio=0.3 × --batch_size=4 = 1.2"),
    (dict(unlabeled_dir=""), r"--unlabeled_ratio=0.5 needs --unlabeled_dir"),
    (dict(variance_focus=1.2), r"--variance_focus: .*\[0, 1\]"),
    (dict(variance_focus=-0.5), r"--variance_focus: .*\[0, 1\]"),
    (dict(teacher_cache=True, augment=True), r"--teacher_cache needs --noaugment"),
    (dict(mode="student", lambda_response=1.0, unlabeled_dir="", unlabeled_ratio=0.0),
     r"need --mode=distill"),
])
def test_bad_distillation_settings_are_refused_naming_the_flag(teacher_run, data_dir, photos, tmp_path,
                                                              changes, message):
    from mdekd.train_config import validate_config

    with pytest.raises(ValueError, match=message):
        validate_config(distill_config(tmp_path, teacher_run, data_dir, photos, **changes))


def test_unlabeled_dir_missing_or_without_images_is_refused(teacher_run, data_dir, photos, tmp_path):
    from mdekd.train_config import validate_config

    with pytest.raises(FileNotFoundError, match="--unlabeled_dir: no such file or folder"):
        validate_config(distill_config(tmp_path, teacher_run, data_dir, photos,
                                       unlabeled_dir=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match="--unlabeled_dir: .* holds no image"):
        validate_config(distill_config(tmp_path, teacher_run, data_dir, photos,
                                       unlabeled_dir=str(tmp_path / "empty")))


def test_distillation_cli_with_unlabelled_photos_and_response_term(teacher_run, data_dir, photos, tmp_path):
    out = tmp_path / "distill"
    result = run_train("--flagfile=configs/quickstart_distill.cfg", *TINY, "--batch_size=4",
                       f"--teacher={teacher_run / 'best.keras'}", f"--data_dir={data_dir}",
                       f"--unlabeled_dir={photos}", "--unlabeled_ratio=0.5", "--lambda_response=1",
                       "--pool_scale=stride16:none,stride8:0.5,stride4:0.25,stride2:0.25",
                       "--feature_activation=relu", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    header, *rows = (out / "metrics.csv").read_text().strip().splitlines()
    values = dict(zip(header.split(","), rows[-1].split(",")))
    assert float(values["response_loss"]) > 0 and float(values["distill_loss"]) > 0
    assert "--unlabeled_ratio=0.5" in (out / "flags.txt").read_text()


def test_pool_scale_flag_parses_one_value_or_one_per_stride():
    from mdekd.train_config import parse_pool_scale

    assert parse_pool_scale("0.5") == 0.5 and parse_pool_scale("none") is None
    assert parse_pool_scale("stride16:none,stride2:0.125") == {"stride16": None, "stride2": 0.125}
    with pytest.raises(ValueError, match="unknown stride 'stride3'"):
        parse_pool_scale("stride3:0.5")


def test_student_depth_prior_sets_the_starting_scale_in_metres():
    from mdekd import models

    keras.utils.set_random_seed(0)
    student = models.build_student((64, 64, 3), alpha=0.25)
    assert models.set_depth_prior(student, 6.0)
    images = np.random.default_rng(0).uniform(size=(4, 64, 64, 3)).astype(np.float32)
    depth = student(images, training=True)["depth"].numpy()
    np.testing.assert_allclose(np.median(depth), 6.0, rtol=0.2)
    teacher = models.build_teacher((64, 64, 3), encoder="resnest14", decoder_channels=16)
    assert not models.set_depth_prior(teacher, 6.0)  # a biased-conv head learns its own scale


def test_training_starts_from_the_median_depth_of_the_training_frames(data_dir, tmp_path):
    from mdekd.data import list_pairs, read_depth_png
    from mdekd.training import training_median_depth

    depths = np.concatenate([read_depth_png(d, 1e-3).ravel() for _, d in list_pairs(data_dir, "train")])
    config = tiny_config(tmp_path, dataset="synthetic", data_dir=str(data_dir))
    assert training_median_depth(config, data_dir) == pytest.approx(np.median(depths[depths > 0]), rel=0.05)
