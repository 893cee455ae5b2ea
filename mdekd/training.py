"""One training run from a ``TrainConfig``: teacher alone, student alone, or student by distillation.

``train.py`` parses flags into a ``TrainConfig`` (``mdekd.train_config``) and calls ``run_training``;
a notebook can do the same. This module assembles the run: data pipelines, networks, trainer,
callbacks (``mdekd.callbacks``) and strategy (``mdekd.multi_worker``); what it writes is described
in ``mdekd.run_folder``.

An "epoch" is ``steps_per_epoch`` optimiser steps on an endlessly repeated training set; resume restarts
from the last completed epoch, so ``steps_per_epoch`` is also the checkpoint interval. After each
epoch the network is measured on the validation split by ``mdekd.evaluate.evaluate_model`` (the
protocol of ``mdekd.evaluate``) and ``best.keras`` is the epoch of lowest si-RMSE.
"""

import dataclasses
import os
import pathlib

import keras
import numpy as np
import tensorflow as tf

from mdekd import distill, models, run_folder
from mdekd.callbacks import DepthPanelLogger, NetworkCheckpoint, StopOnNonFiniteLoss, ValidationMetrics
from mdekd.constants import valid_depth
from mdekd.models.common import iter_layers
from mdekd.multi_worker import fit_custom_loop, make_strategy, worker_output_dir
from mdekd.schedules import make_schedule
from mdekd.train_config import unlabeled_per_batch, validate_config


def run_training(config, flags_text=None, progress=True):
    """Train as ``config`` says; returns ``{"best": path, "last": path, "history": {...},
    "output_dir": path}``."""
    validate_config(config)
    output_dir = run_folder.prepare_output_dir(config.output_dir)
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")

    data_dir = ensure_dataset(config)
    strategy = make_strategy(config.distribution)
    worker_dir = worker_output_dir(output_dir, strategy)
    run_folder.write_run_files(worker_dir, config, data_dir, flags_text)

    steps_per_epoch = _steps_per_epoch(config, data_dir)
    total_steps = steps_per_epoch * config.epochs

    with strategy.scope():
        network, rebuild = build_network(config)
        models.set_depth_prior(network, training_median_depth(config, data_dir))
        trainer = build_trainer(config, network)
    train_ds = _training_dataset(config, data_dir, worker_dir, trainer)
    with strategy.scope():
        schedule = make_schedule(config.schedule, config.learning_rate, total_steps,
                                 config.warmup_steps)
        trainer.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
                        jit_compile=False)  # toolchain.md §10: XLA fails under tf.distribute on CPU

    checkpoint = NetworkCheckpoint(network, worker_dir, rebuild=rebuild)
    layout = {} if config.depth_scale is None else {"depth_scale": config.depth_scale}
    validation_images = config.validation_steps * config.batch_size or None
    callbacks = [  # ValidationMetrics first: the others read its val_* logs (mdekd.callbacks)
        ValidationMetrics(network, data_dir, config.dataset, max_images=validation_images, **layout),
        StopOnNonFiniteLoss(steps_per_epoch, checkpoint),
        checkpoint,
        keras.callbacks.BackupAndRestore(str(worker_dir / run_folder.BACKUP_DIR), save_freq="epoch",
                                         delete_checkpoint=False),
        keras.callbacks.CSVLogger(str(worker_dir / "metrics.csv"), append=True),
    ]
    if config.distribution == "multi_worker":
        history = fit_custom_loop(trainer, strategy, train_ds, config.epochs, steps_per_epoch,
                                  callbacks, initial_epoch=run_folder.resumed_epoch(worker_dir))
    else:
        callbacks += [
            keras.callbacks.TensorBoard(str(worker_dir / "tensorboard"), write_graph=False),
            DepthPanelLogger(network, _panel_batch(config, data_dir),
                             worker_dir / "tensorboard" / "images"),
        ]
        result = trainer.fit(train_ds, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                             callbacks=callbacks, shuffle=False,  # the dataset shuffles itself
                             verbose=1 if progress else 0)
        history = result.history
    return {"best": str(checkpoint.best_path), "last": str(checkpoint.last_path),
            "history": history, "output_dir": str(worker_dir)}


# ------------------------------------------------------------------------------------------- data

def ensure_dataset(config):
    """The data root; for ``--dataset=synthetic`` the scene set is generated once if it is absent."""
    from mdekd.data import synthetic

    root = pathlib.Path(config.data_dir)
    # An existing scene set is reused at whatever size it was rendered; the pipeline resizes it.
    if config.dataset == "synthetic" and not (root / "train").is_dir():
        synthetic.generate_dataset(root, train=config.synthetic_train,
                                   validation=config.synthetic_validation, height=config.height,
                                   width=config.width, seed=config.seed, progress=True)
    elif not root.is_dir():
        raise FileNotFoundError(f"--data_dir: dataset folder not found: {root}")
    return root


def _dataset(config, data_dir, split, **kwargs):
    from mdekd.data import build_dataset

    options = {} if config.depth_scale is None else {"depth_scale": config.depth_scale}
    return build_dataset(data_dir, split=split, dataset=config.dataset, batch_size=config.batch_size,
                         image_size=(config.height, config.width), seed=config.seed, **options,
                         **kwargs)


def _steps_per_epoch(config, data_dir):
    from mdekd.data import num_examples

    num_train = num_examples(data_dir, "train", config.dataset)
    labelled = config.batch_size - unlabeled_per_batch(config)
    if num_train < labelled:
        raise ValueError(f"--batch_size={config.batch_size} needs {labelled} labelled pairs per batch, "
                         f"more than the {num_train} training pairs in {data_dir}")
    return config.steps_per_epoch or num_train // labelled


def _training_dataset(config, data_dir, output_dir, trainer):
    """Endless training batches: labelled pairs, plus ``--unlabeled_ratio`` photos of each batch
    (depth 0) from ``--unlabeled_dir``; with ``--teacher_cache`` each frame also carries the
    teacher's targets, computed once (``Distiller`` batches of the form ``({"image", ...}, depth)``)."""
    from mdekd.data import build_unlabeled_dataset, mix_batches

    unlabelled = unlabeled_per_batch(config)
    # A resumed run reshuffles with a new seed instead of replaying the first epoch's batches.
    seed = config.seed + run_folder.resumed_epoch(output_dir)
    cache = config.teacher_cache and isinstance(trainer, distill.Distiller)
    streams = [_dataset(dataclasses.replace(config, seed=seed, batch_size=config.batch_size - unlabelled),
                        data_dir, "train", augment=config.augment, shuffle=True, repeat=True,
                        return_index=cache)]
    if cache:
        table = _cached_targets(trainer, config, data_dir, lambda: _dataset(
            config, data_dir, "train", augment=False, shuffle=False, repeat=False))
        streams[0] = _with_targets(streams[0], table)
    if unlabelled:
        def photos(**kwargs):
            return build_unlabeled_dataset(config.unlabeled_dir, image_size=config.input_shape[:2],
                                           **kwargs)

        stream = photos(batch_size=unlabelled, augment=config.augment, seed=seed, return_index=cache)
        if cache:
            stream = _with_targets(stream, _cached_targets(trainer, config, config.unlabeled_dir, lambda: photos(
                batch_size=config.batch_size, shuffle=False, repeat=False)))
        streams.append(stream)
    ds = streams[0] if len(streams) == 1 else mix_batches(*streams)
    return _with_data_sharding(ds)


_TARGET_TABLES = {}  # (teacher, frames, settings) -> targets: runs in one process share them


def training_median_depth(config, data_dir, frames=64):
    """Median valid depth (metres) of the first ``frames`` training pairs: the student's starting
    scale (``models.set_depth_prior``)."""
    ds = _dataset(dataclasses.replace(config, batch_size=1), data_dir, "train", augment=False,
                  shuffle=False, repeat=False)
    depths = np.concatenate([depth.numpy().ravel() for _, depth in ds.take(frames)])
    valid = depths[valid_depth(depths)]
    return float(np.median(valid)) if valid.size else 1.0


def _cached_targets(distiller, config, source, make_dataset):
    """The teacher's targets for every frame of the unshuffled ``make_dataset()`` (row i = frame
    i), as non-trainable variables keyed like ``Distiller.teacher_targets``. Computed once per
    process for a given teacher file, frame source and target settings."""
    key = (os.path.realpath(config.teacher), os.path.realpath(source), config.input_shape,
           distiller.target_names, repr(distiller.pool_sizes), distiller.feature_activation)
    if key not in _TARGET_TABLES:
        _TARGET_TABLES[key] = distill.teacher_targets_of_batches(
            distiller, (images for images, _ in make_dataset()))
    return {name: tf.Variable(values, trainable=False, name=f"cached_{name}")
            for name, values in _TARGET_TABLES[key].items()}


def _with_targets(ds, table):
    def attach(images, depths, index):
        return {"image": images, **{name: tf.gather(values, index) for name, values in table.items()}}, depths

    return ds.map(attach, num_parallel_calls=tf.data.AUTOTUNE)


def _with_data_sharding(ds):
    # File-based auto-sharding fails on datasets built from tensors; shard by batch instead.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _panel_batch(config, data_dir, count=4):
    """The first ``count`` validation pairs at the model size: the TensorBoard panel's scenes."""
    ds = _dataset(dataclasses.replace(config, batch_size=count), data_dir, "validation",
                  augment=False, shuffle=False, repeat=False)
    images, depths = next(iter(ds.take(1)))
    return images.numpy(), depths.numpy()


# ---------------------------------------------------------------------------------------- networks

def build_network(config):
    """(network to train, float32 rebuild function) for ``config.mode``."""
    weights = config.encoder_weights or None
    if config.mode == "teacher":
        def rebuild():
            return models.build_teacher(config.input_shape, encoder=config.teacher_encoder,
                                        encoder_weights=weights,
                                        decoder_channels=config.teacher_decoder_channels)
    else:
        def rebuild():
            return models.build_student(config.input_shape, encoder=config.student_encoder,
                                        decoder_attention=config.decoder_attention, encoder_weights=weights,
                                        upsampling=config.upsampling, alpha=config.student_alpha,
                                        depth_output=config.depth_output)
    network = rebuild()
    if config.distribution != "none" and config.sync_batch_norm:
        synchronize_batch_norm(network)
    return network, rebuild


def synchronize_batch_norm(model):
    """Make every BatchNormalization in ``model`` (nested models included) use global-batch moments.

    Unsynchronised, each replica normalises with its own sub-batch and the moving statistics come
    from replica 0 only (toolchain.md §10), so 2 replicas would not reproduce the 1-device update.
    """
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def build_trainer(config, network):
    """``DepthTrainer`` (teacher/student modes) or ``Distiller`` (distill mode) around ``network``."""
    supervised = dict(lambda_si=config.lambda_si, lambda_gml=config.lambda_gml,
                      variance_focus=config.variance_focus)
    if config.mode != "distill":
        return distill.DepthTrainer(network, **supervised)
    teacher = load_teacher(config)
    return distill.Distiller(teacher=teacher, student=network, lambda_d=config.lambda_d,
                             strides=config.distill_strides, pool_scale=config.pool_scale,
                             feature_activation=config.feature_activation or None,
                             lambda_response=config.lambda_response, **supervised)


def load_teacher(config):
    """The frozen teacher from ``--teacher``: a ``.keras`` model or a weights file for the teacher
    that ``--teacher_encoder/--teacher_decoder_channels`` build at the training input size."""
    path = config.teacher
    if path.endswith(".keras"):
        try:
            teacher = keras.models.load_model(path, compile=False)
        except Exception as error:  # keras raises several types for unreadable archives
            raise ValueError(f"--teacher: cannot load '{path}': {error}") from error
    else:
        teacher = models.build_teacher(config.input_shape, encoder=config.teacher_encoder,
                                       decoder_channels=config.teacher_decoder_channels)
        try:
            teacher.load_weights(path)
        except Exception as error:
            raise ValueError(f"--teacher: weights '{path}' do not fit a {config.teacher_encoder} "
                             f"teacher with decoder_channels={config.teacher_decoder_channels}: "
                             f"{error}") from error
    shape = tuple(teacher.input_shape[1:3])
    if shape != config.input_shape[:2]:
        raise ValueError(f"--teacher: '{path}' was built for input H×W {shape}, but training uses "
                         f"{config.input_shape[:2]} (--height/--width)")
    teacher.trainable = False
    return teacher


