"""Distribution: the ``tf.distribute`` strategy of ``--distribution`` and the multi-worker training loop.

Keras 3's ``fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585,
toolchain.md §11), so multi-worker runs use ``fit_custom_loop``: ``strategy.run`` over the
trainer's ``train_step`` with the same callbacks, ``BackupAndRestore`` included, so they
checkpoint every epoch and resume like single-process runs. Every worker trains; the chief writes
the run folder, the others ``<output_dir>/<task><id>`` (``worker_output_dir``).
"""

import os
import pathlib

import tensorflow as tf

DISTRIBUTIONS = ("none", "mirrored", "multi_worker")


def make_strategy(distribution):
    """The ``tf.distribute`` strategy for ``--distribution``."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"--distribution: unknown '{distribution}'; expected one of {DISTRIBUTIONS}")
    if distribution == "none":
        return tf.distribute.get_strategy()
    if distribution == "mirrored":
        return tf.distribute.MirroredStrategy()
    if not os.environ.get("TF_CONFIG"):
        raise ValueError("--distribution=multi_worker needs the TF_CONFIG environment variable "
                         "(cluster and task of this worker)")
    return tf.distribute.MultiWorkerMirroredStrategy()


def fit_custom_loop(trainer, strategy, train_ds, epochs, steps_per_epoch, callbacks, initial_epoch=0):
    """``trainer.fit`` for ``MultiWorkerMirroredStrategy``: epochs ``initial_epoch``..``epochs - 1``
    of ``steps_per_epoch`` distributed ``train_step`` calls, with the callbacks' train, epoch and
    batch hooks (a ``BackupAndRestore`` among them restores weights and optimiser in
    ``on_train_begin``). Returns the history dict of the epochs run."""
    train_iter = iter(strategy.experimental_distribute_dataset(train_ds))

    @tf.function
    def train_step(iterator):
        strategy.run(trainer.train_step, args=(next(iterator),))

    with strategy.scope():
        # BackupAndRestore loads optimiser slots into existing variables: create them (mirrored) first.
        trainer.optimizer.build(trainer.trainable_variables)
    for callback in callbacks:
        callback.set_model(trainer)
        callback.on_train_begin()
    history = {}
    for epoch in range(initial_epoch, epochs):
        for callback in callbacks:
            callback.on_epoch_begin(epoch)
        trainer.reset_metrics()
        logs = {}
        for batch in range(steps_per_epoch):
            train_step(train_iter)
            logs = {name: float(t.result()) for name, t in trainer.loss_trackers.items()}
            for callback in callbacks:
                callback.on_train_batch_end(batch, logs)
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
    for callback in callbacks:
        callback.on_train_end()
    return history


def worker_output_dir(output_dir, strategy):
    """--output_dir for the chief (or a single process); ``<output_dir>/<task><id>`` for the others."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type or is_chief(resolver):
        return pathlib.Path(output_dir)
    path = pathlib.Path(output_dir) / f"{resolver.task_type}{resolver.task_id}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_chief(resolver):
    """Whether this task writes the run folder: the "chief", else worker 0 of a chief-less cluster."""
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief
