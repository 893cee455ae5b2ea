"""Keras callbacks of a training run: checkpoints, validation metrics, NaN stop, TensorBoard panel.

``run_training`` orders them ``ValidationMetrics`` (adds ``val_*`` metrics to the epoch logs) ->
``StopOnNonFiniteLoss`` -> ``NetworkCheckpoint`` (selects ``best.keras`` by ``val_si_rmse``) -> the
loggers, so every later callback sees the validation metrics.
"""

import json
import pathlib

import keras
import numpy as np
import tensorflow as tf

from mdekd import run_folder
from mdekd.atomic import atomic_path, write_text_atomically


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; the message names the step and the loss terms."""


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
        self.best_path = self.output_dir / run_folder.BEST_MODEL
        self.last_path = self.output_dir / run_folder.LAST_MODEL
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


class ValidationMetrics(keras.callbacks.Callback):
    """design.md §2 metrics of the network on the validation split after each epoch, added to the
    epoch logs as ``val_<metric>`` (``val_si_rmse``, ``val_abs_rel``, ...).

    Measured by ``mdekd.evaluate.evaluate_model``, the protocol of ``mdekd.evaluate``, export and
    the ablation: images resized to the model input, predictions resized back to each truth's own
    size, metrics on the truth's valid pixels. ``max_images``: the first N pairs only.
    """

    def __init__(self, network, data_dir, dataset, max_images=None, **layout_options):
        from mdekd.tflite_runner import KerasRunner

        super().__init__()
        self.runner = KerasRunner(network)  # one traced forward pass for the whole run
        self.data_dir = data_dir
        self.dataset = dataset
        self.max_images = max_images
        self.layout_options = layout_options

    def on_epoch_end(self, epoch, logs=None):
        from mdekd.evaluate import evaluate_model

        result = evaluate_model(self.runner, self.data_dir, self.dataset, max_images=self.max_images,
                                **self.layout_options)
        if logs is not None:
            logs.update({f"val_{name}": value for name, value in result["metrics"].items()})
