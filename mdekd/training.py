"""One training run from a ``TrainConfig``: teacher alone, student alone, or student by distillation.

``train.py`` parses flags into a ``TrainConfig`` and calls ``run_training``; a notebook can do the same.
A run directory holds:

- ``best.keras`` / ``last.keras``: the trained **network** (never the Distiller), float32;
- ``run.json`` (mode, input shape, data) and ``flags.txt`` (the flags used, flagfile format);
- ``metrics.csv`` (one row per epoch), ``tensorboard/`` (loss terms, metrics, an RGB | truth | prediction
  | error panel each epoch), ``backup/`` (weights + optimiser + epoch, for resuming an interrupted run).

An "epoch" is ``steps_per_epoch`` optimiser steps on an endlessly repeated training set; resume restarts
from the last completed epoch, so ``steps_per_epoch`` is also the checkpoint interval.
"""

import dataclasses
import json
import os
import pathlib
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from mdekd import distill, losses, models
from mdekd.atomic import atomic_path, write_text_atomically
from mdekd.constants import valid_depth
from mdekd.schedules import make_schedule

MODES = ("teacher", "student", "distill")
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; field names are the ``train.py`` flag names."""

    mode: str = "student"
    output_dir: str = "runs/student"
    # data
    dataset: str = "synthetic"
    data_dir: str = "data/synthetic"
    depth_scale: float | None = None
    synthetic_train: int = 200
    synthetic_validation: int = 40
    height: int = 128
    width: int = 160
    augment: bool = True
    # optimisation
    batch_size: int = 8
    epochs: int = 3
    steps_per_epoch: int = 0  # 0: one pass over the training set
    validation_steps: int = 0  # 0: the whole validation split
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    # losses (docs/design.md §1 defaults)
    lambda_si: float = losses.DEFAULT_LAMBDA_SI
    lambda_gml: float = losses.DEFAULT_LAMBDA_GML
    lambda_d: float = losses.DEFAULT_LAMBDA_D
    lambda_response: float = 0.0
    variance_focus: float = losses.METRIC_VARIANCE_FOCUS
    distill_strides: tuple = distill.DISTILL_STRIDES
    pool_scale: float | None | dict = losses.DEFAULT_POOL_SCALE
    feature_activation: str = ""  # "" = the maps as output (paper), "relu"
    # unlabelled photos (distill mode): a fraction of every batch, distillation terms only
    unlabeled_dir: str = ""
    unlabeled_ratio: float = 0.0
    teacher_cache: bool = False  # precompute the teacher's targets once (needs augment=False)
    # networks
    teacher: str = ""
    teacher_encoder: str = "resnest101"
    teacher_decoder_channels: int = 256
    student_alpha: float = 1.0
    upsampling: str = "bilinear"
    encoder_weights: str = ""
    # execution
    seed: int = 0
    distribution: str = "none"
    sync_batch_norm: bool = True
    mixed_precision: bool = False

    @property
    def input_shape(self):
        return (self.height, self.width, 3)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; the message names the step and the loss terms."""


def run_training(config, flags_text=None, progress=True):
    """Train as ``config`` says; returns ``{"best": path, "last": path, "history": [...]}``."""
    validate_config(config)
    output_dir = prepare_output_dir(config.output_dir)
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")

    data_dir = ensure_dataset(config)
    strategy = make_strategy(config.distribution)
    worker_dir = _worker_output_dir(output_dir, strategy)
    _write_run_files(worker_dir, config, data_dir, flags_text)

    steps_per_epoch = _steps_per_epoch(config, data_dir)
    val_ds = _validation_dataset(config, data_dir)
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

    panel = _panel_batch(val_ds)
    checkpoint = NetworkCheckpoint(network, worker_dir, rebuild=rebuild)
    callbacks = [
        StopOnNonFiniteLoss(steps_per_epoch, checkpoint),
        checkpoint,
        keras.callbacks.CSVLogger(str(worker_dir / "metrics.csv"), append=True),
    ]
    if config.distribution == "multi_worker":
        history = fit_custom_loop(trainer, strategy, train_ds, val_ds, config.epochs,
                                  steps_per_epoch, config.validation_steps or None, callbacks)
    else:
        callbacks += [
            keras.callbacks.BackupAndRestore(str(worker_dir / "backup"), save_freq="epoch",
                                             delete_checkpoint=False),
            keras.callbacks.TensorBoard(str(worker_dir / "tensorboard"), write_graph=False),
            DepthPanelLogger(network, panel, worker_dir / "tensorboard" / "images"),
        ]
        result = trainer.fit(train_ds, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                             validation_data=val_ds,
                             validation_steps=config.validation_steps or None,
                             callbacks=callbacks, shuffle=False,  # the dataset shuffles itself
                             verbose=1 if progress else 0)
        history = result.history
    return {"best": str(checkpoint.best_path), "last": str(checkpoint.last_path),
            "history": history, "output_dir": str(worker_dir)}


# ----------------------------------------------------------------------------------------- checks

def validate_config(config):
    """Raise ValueError naming the flag for settings that cannot work, before anything is built."""
    if config.mode not in MODES:
        raise ValueError(f"--mode: unknown mode '{config.mode}'; expected one of {MODES}")
    if config.distribution not in DISTRIBUTIONS:
        raise ValueError(f"--distribution: unknown '{config.distribution}'; expected one of {DISTRIBUTIONS}")
    if config.mode == "distill":
        if not config.teacher:
            raise ValueError("--mode=distill needs --teacher (a teacher .keras file or weights file)")
        if not os.path.exists(config.teacher):
            raise FileNotFoundError(f"--teacher: file not found: {config.teacher}")
        unknown = [s for s in config.distill_strides if s not in distill.DISTILL_STRIDES]
        if unknown or not config.distill_strides:
            raise ValueError(f"--distill_strides: {list(config.distill_strides)} must be a non-empty "
                             f"subset of {list(distill.DISTILL_STRIDES)}")
        if (config.feature_activation or None) not in distill.FEATURE_ACTIVATIONS:
            raise ValueError(f"--feature_activation: expected '' or 'relu', got "
                             f"'{config.feature_activation}'")
        if config.teacher_cache and config.augment:
            raise ValueError("--teacher_cache needs --noaugment: targets computed once cannot follow "
                             "augmented images (without the cache the teacher sees each augmented batch)")
    elif config.unlabeled_dir or config.lambda_response:
        raise ValueError("--unlabeled_dir and --lambda_response need --mode=distill (a teacher)")
    losses.check_variance_focus(config.variance_focus, "--variance_focus")
    if unlabeled_per_batch(config):
        from mdekd.data import list_images

        list_images(config.unlabeled_dir)  # missing, empty or image-less folders fail here
    if config.height % 32 or config.width % 32:
        raise ValueError(f"--height/--width: {config.height}x{config.width} must both be divisible by 32")
    if config.batch_size < 1 or config.epochs < 1:
        raise ValueError("--batch_size and --epochs must be at least 1")
    if config.mixed_precision and not tf.config.list_physical_devices("GPU"):
        raise ValueError("--mixed_precision needs a GPU: on CPU mixed_float16 is 4-5x slower and "
                         "cannot be exported to TFLite (toolchain.md §12); train in float32 on CPU")


def parse_pool_scale(text):
    """``--pool_scale``: a number, 'none', or 'stride16:none,stride8:0.25,...' (one per stride)."""
    def value(item):
        item = item.strip().lower()
        try:
            return None if item in ("none", "") else float(item)
        except ValueError:
            raise ValueError(f"--pool_scale: expected a number or 'none', got '{text}'") from None

    if ":" not in text:
        return value(text)
    grid = {}
    for item in text.split(","):
        name, _, scale = item.partition(":")
        if name.strip() not in distill.DISTILL_STRIDES:
            raise ValueError(f"--pool_scale: unknown stride '{name}' in '{text}'; expected "
                             f"{list(distill.DISTILL_STRIDES)}")
        grid[name.strip()] = value(scale)
    return grid


def unlabeled_per_batch(config):
    """Unlabelled frames per batch, ``--unlabeled_ratio × --batch_size``, which must be whole."""
    ratio = config.unlabeled_ratio
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--unlabeled_ratio: expected a fraction in [0, 1), got {ratio}")
    if ratio and not config.unlabeled_dir:
        raise ValueError(f"--unlabeled_ratio={ratio} needs --unlabeled_dir (a folder of photos)")
    if config.unlabeled_dir and not ratio:
        raise ValueError("--unlabeled_dir needs --unlabeled_ratio > 0 (the share of each batch)")
    count = ratio * config.batch_size
    if abs(count - round(count)) > 1e-9:
        raise ValueError(f"--unlabeled_ratio={ratio} × --batch_size={config.batch_size} = {count:g} "
                         "unlabelled frames per batch; choose values whose product is a whole number")
    return int(round(count))


def prepare_output_dir(path):
    """Create ``path`` and prove it is writable; raise a clear error otherwise."""
    path = pathlib.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as error:
        raise PermissionError(f"--output_dir: cannot write to '{path}': {error.strerror}") from error
    return path


def make_strategy(distribution):
    """The ``tf.distribute`` strategy for ``--distribution``."""
    if distribution == "none":
        return tf.distribute.get_strategy()
    if distribution == "mirrored":
        return tf.distribute.MirroredStrategy()
    if not os.environ.get("TF_CONFIG"):
        raise ValueError("--distribution=multi_worker needs the TF_CONFIG environment variable "
                         "(cluster and task of this worker)")
    return tf.distribute.MultiWorkerMirroredStrategy()


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
    seed = config.seed + _resumed_epoch(output_dir)
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


def _validation_dataset(config, data_dir):
    ds = _dataset(config, data_dir, "validation", augment=False, shuffle=False, repeat=False)
    return _with_data_sharding(ds)


def _with_data_sharding(ds):
    # File-based auto-sharding fails on datasets built from tensors; shard by batch instead.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _resumed_epoch(output_dir):
    metadata = pathlib.Path(output_dir) / "backup" / "training_metadata.json"
    if metadata.exists():
        return int(json.loads(metadata.read_text()).get("epoch", 0))
    return 0


def _panel_batch(val_ds, count=4):
    images, depths = next(iter(val_ds.unbatch().batch(count).take(1)))
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
            return models.build_student(config.input_shape, encoder_weights=weights,
                                        upsampling=config.upsampling, alpha=config.student_alpha)
    network = rebuild()
    if config.distribution != "none" and config.sync_batch_norm:
        synchronize_batch_norm(network)
    return network, rebuild


def synchronize_batch_norm(model):
    """Make every BatchNormalization in ``model`` (nested models included) use global-batch moments.

    Unsynchronised, each replica normalises with its own sub-batch and the moving statistics come
    from replica 0 only (toolchain.md §10), so 2 replicas would not reproduce the 1-device update.
    """
    for layer in model._flatten_layers(include_self=False, recursive=True):
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


# --------------------------------------------------------------------------------------- callbacks

def save_model_atomically(model, path):
    """``model.save(path)`` atomically (``mdekd.atomic``)."""
    with atomic_path(path) as tmp:
        model.save(tmp)


class NetworkCheckpoint(keras.callbacks.Callback):
    """Saves the trained network (float32) as ``last.keras`` each epoch and ``best.keras`` when
    ``monitor`` improves; the best value survives a resume through ``best.json``."""

    def __init__(self, network, output_dir, rebuild=None, monitor="val_si_rmse"):
        super().__init__()
        self.network = network
        self.rebuild = rebuild
        self.monitor = monitor
        self.output_dir = pathlib.Path(output_dir)
        self.best_path = self.output_dir / "best.keras"
        self.last_path = self.output_dir / "last.keras"
        self._best_record = self.output_dir / "best.json"
        self.enabled = True

    def _best_value(self):
        if self._best_record.exists():
            return json.loads(self._best_record.read_text())["value"]
        return float("inf")

    def on_epoch_end(self, epoch, logs=None):
        if not self.enabled:
            return
        logs = logs or {}
        network = self._float32_network()
        save_model_atomically(network, self.last_path)
        value = logs.get(self.monitor, logs.get("loss"))
        if value is not None and np.isfinite(value) and value < self._best_value():
            save_model_atomically(network, self.best_path)
            record = {"epoch": epoch + 1, "monitor": self.monitor, "value": float(value)}
            write_text_atomically(self._best_record, json.dumps(record))
        elif not self.best_path.exists():
            save_model_atomically(network, self.best_path)

    def _float32_network(self):
        # toolchain.md §12: a mixed_float16 model cannot be converted to TFLite; save a float32 twin.
        if keras.mixed_precision.global_policy().compute_dtype == "float32" or self.rebuild is None:
            return self.network
        policy = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("float32")
        try:
            twin = self.rebuild()
            twin.set_weights(self.network.get_weights())
        finally:
            keras.mixed_precision.set_global_policy(policy)
        return twin


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops at the first NaN/Inf loss with a message naming the step and the loss terms.

    Raising (rather than ``stop_training``) keeps the end-of-epoch callbacks from saving NaN weights,
    so ``last.keras``, ``best.keras`` and the backup remain those of the last good epoch.
    """

    def __init__(self, steps_per_epoch, checkpoint=None):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.checkpoint = checkpoint
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if all(np.isfinite(float(v)) for v in logs.values()):
            return
        if self.checkpoint is not None:
            self.checkpoint.enabled = False
        step = self._epoch * self.steps_per_epoch + batch + 1
        terms = ", ".join(f"{k}={float(v):.6g}" for k, v in logs.items())
        kept = self.checkpoint.last_path if self.checkpoint else "none"
        raise NonFiniteLossError(
            f"non-finite loss at training step {step} (epoch {self._epoch + 1}, batch {batch + 1}): "
            f"{terms}. Stopped; the last good checkpoint is kept ({kept}).")


class DepthPanelLogger(keras.callbacks.Callback):
    """Writes an RGB | truth | prediction | error panel of a fixed validation batch to TensorBoard."""

    def __init__(self, network, batch, log_dir):
        super().__init__()
        self.network = network
        self.images, self.depths = batch
        self.writer = tf.summary.create_file_writer(str(log_dir))

    def on_epoch_end(self, epoch, logs=None):
        from mdekd.predict import depth_panel

        predictions = self.network(self.images, training=False)["depth"].numpy()
        panels = np.stack([
            depth_panel(image, truth[..., 0], pred[..., 0])
            for image, truth, pred in zip(self.images, self.depths, predictions)
        ])
        with self.writer.as_default():
            tf.summary.image("rgb_truth_prediction_error", panels, step=epoch, max_outputs=len(panels))
        self.writer.flush()


# -------------------------------------------------------------------------------- multi-worker loop

def fit_custom_loop(trainer, strategy, train_ds, val_ds, epochs, steps_per_epoch,
                    validation_steps, callbacks):
    """``fit`` for ``MultiWorkerMirroredStrategy``, where Keras 3's own ``fit`` fails
    (keras-team/keras#20585, toolchain.md §11): ``strategy.run`` over ``train_step`` / ``test_step``
    with the same callbacks' epoch hooks. Returns the history dict."""
    train_iter = iter(strategy.experimental_distribute_dataset(train_ds))

    @tf.function
    def train_step(iterator):
        strategy.run(trainer.train_step, args=(next(iterator),))

    @tf.function
    def test_step(batch):
        strategy.run(trainer.test_step, args=(batch,))

    for callback in callbacks:
        callback.set_model(trainer)
        callback.on_train_begin()
    history = {}
    for epoch in range(epochs):
        for callback in callbacks:
            callback.on_epoch_begin(epoch)
        trainer.reset_metrics()
        for batch in range(steps_per_epoch):
            train_step(train_iter)
            logs = {name: float(t.result()) for name, t in trainer.loss_trackers.items()}
            for callback in callbacks:
                callback.on_train_batch_end(batch, logs)
        trainer.reset_metrics()
        for index, batch in enumerate(strategy.experimental_distribute_dataset(val_ds)):
            if validation_steps and index >= validation_steps:
                break
            test_step(batch)
        logs.update({f"val_{t.name}": float(t.result()) for t in trainer.metrics})
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)
    for callback in callbacks:
        callback.on_train_end()
    return history


def _worker_output_dir(output_dir, strategy):
    """--output_dir for the chief (or a single process); ``<output_dir>/<task><id>`` for the others."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type or _is_chief(resolver):
        return pathlib.Path(output_dir)
    path = pathlib.Path(output_dir) / f"{resolver.task_type}{resolver.task_id}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _is_chief(resolver):
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def _write_run_files(output_dir, config, data_dir, flags_text):
    record = dataclasses.asdict(config)
    record.update(input_shape=list(config.input_shape), data_dir=str(data_dir),
                  started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    for name, text in (("run.json", json.dumps(record, indent=2, default=str)),
                       ("flags.txt", flags_text)):
        if text is not None:
            write_text_atomically(pathlib.Path(output_dir) / name, text)
