"""Run by tests/test_training.py in a fresh process (TF's devices can only be configured at start).

``python tests/distributed_run.py frozen_bn|sync_bn OUT.npz``: trains the tiny student for a few SGD steps on one
fixed global batch, on 1 device and mirrored over 2 logical CPUs, and saves the weight sets. Two
variants: BatchNormalization frozen (samples independent, so the updates must agree to float error)
and BatchNormalization synchronised across replicas (training-mode moments of the global batch).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main(variant, out_path):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from mdekd.distill import DepthTrainer
    from mdekd.models import build_student
    from mdekd.models.common import iter_layers
    from mdekd.training import synchronize_batch_norm

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (4, 64, 64, 3)).astype(np.float32)
    depths = (1.0 + 9.0 * rng.uniform(0, 1, (4, 64, 64, 1))).astype(np.float32)
    keras.utils.set_random_seed(0)
    initial = build_student((64, 64, 3), alpha=0.25).get_weights()

    results = {"initial": np.concatenate([w.ravel() for w in initial])}
    for replicas in (1, 2):
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:replicas]
        strategy = tf.distribute.MirroredStrategy(devices)
        with strategy.scope():
            student = build_student((64, 64, 3), alpha=0.25)
            student.set_weights(initial)
            synchronize_batch_norm(student)
            for layer in iter_layers(student):
                if variant == "frozen_bn" and isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False
            trainer = DepthTrainer(student)
            # SGD: the update is proportional to the gradient (Adam would hide a 2x error).
            trainer.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=False)
        trainer.fit(images, depths, batch_size=4, epochs=2, shuffle=False, verbose=0)
        results[f"replicas{replicas}"] = np.concatenate(
            [w.ravel() for w in student.get_weights()])
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
