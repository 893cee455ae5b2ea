"""Depth-model runners: one ``predict`` interface for a Keras model and a LiteRT (.tflite) model.

Both take RGB float32 images (B, H, W, 3) in [0, 1] at the model's fixed input size and return
depth (B, H, W, 1) float32 metres. ``load_depth_runner(path)`` picks the runner from the suffix.

LiteRT (``ai_edge_litert``, toolchain.md §7): XNNPACK is on by default, but ``num_threads`` defaults
to 1, so it is always passed explicitly here. The model is run through its signature runner, which
returns outputs by name (toolchain.md §6: the flat output order is not the Keras one).
"""

import os
import re

import numpy as np

DEFAULT_NUM_THREADS = 2  # the 2-core machine of toolchain.md §8; LiteRT's own default is 1


class TFLiteRunner:
    """A .tflite depth model under LiteRT with an explicit thread count.

    ``model``: a path to a ``.tflite`` file or the flatbuffer bytes. The model must have one image
    input (1, H, W, 3) float32 and a depth output, either its only output or one named ``depth``.
    """

    format = "tflite"

    def __init__(self, model, num_threads=DEFAULT_NUM_THREADS):
        from ai_edge_litert.interpreter import Interpreter

        if isinstance(model, (str, os.PathLike)):
            self.source = os.fspath(model)
            if not os.path.isfile(self.source):
                raise FileNotFoundError(f"TFLite model not found: {self.source}")
            with open(self.source, "rb") as f:
                model = f.read()
        else:
            self.source = "<bytes>"
        self.model_bytes = bytes(model)
        self.num_threads = int(num_threads)
        try:
            self.interpreter = Interpreter(
                model_content=self.model_bytes, num_threads=self.num_threads
            )
        except ValueError as error:
            raise ValueError(f"{self.source}: not a loadable TFLite model ({error})") from error
        signatures = self.interpreter.get_signature_list()
        if not signatures:
            raise ValueError(f"{self.source}: the TFLite model has no signature to run")
        self._signature = self.interpreter.get_signature_runner(next(iter(signatures)))
        inputs = self._signature.get_input_details()
        if len(inputs) != 1:
            raise ValueError(
                f"{self.source}: expected one image input, found {len(inputs)}: {list(inputs)}"
            )
        self._input_name, input_details = next(iter(inputs.items()))
        shape = tuple(int(d) for d in input_details["shape"])
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{self.source}: expected an input (1, H, W, 3), found {shape}")
        self.input_shape = shape[1:]
        outputs = self._signature.get_output_details()
        if "depth" in outputs:
            self._output_name = "depth"
        elif len(outputs) == 1:
            self._output_name = next(iter(outputs))
        else:
            raise ValueError(
                f"{self.source}: expected a single output or one named 'depth', found {list(outputs)}"
            )

    @property
    def input_size(self):
        """(H, W) of the model input, pixels."""
        return self.input_shape[:2]

    def run_one(self, image):
        """Depth of one image (1, H, W, 3) float32 [0, 1] -> (1, H, W, 1) float32 metres."""
        outputs = self._signature(**{self._input_name: image})
        return outputs[self._output_name]

    def predict(self, images):
        """Depth of (B, H, W, 3) float32 [0, 1] images -> (B, H, W, 1) float32 metres.

        The interpreter runs one image at a time: the graph is built for batch 1 and resizing it
        would re-plan the XNNPACK delegate on every batch-size change.
        """
        images = _check_images(images, self.input_size, self.source)
        return np.concatenate([self.run_one(images[i : i + 1]) for i in range(len(images))])


class KerasRunner:
    """A Keras depth model (dict outputs with ``depth``, or depth-only) run by a ``tf.function``.

    ``model``: a ``keras.Model`` or a path to a ``.keras`` file (``load_keras_model`` rules).
    """

    format = "keras"

    def __init__(self, model):
        import keras
        import tensorflow as tf

        if isinstance(model, (str, os.PathLike)):
            self.source = os.fspath(model)
            model = load_keras_model(self.source)
        else:
            self.source = getattr(model, "name", "<keras.Model>")
        self.model = depth_only_model(model)
        shape = tuple(self.model.input_shape)
        if len(shape) != 4 or shape[-1] != 3 or None in shape[1:3]:
            raise ValueError(
                f"{self.source}: expected a fixed input (None, H, W, 3), found {shape}"
            )
        self.input_shape = tuple(int(d) for d in shape[1:])
        network = self.model

        @tf.function(reduce_retracing=True)
        def forward(images):
            return network(images, training=False)

        self.forward = forward  # (B, H, W, 3) tensor -> (B, H, W, 1) tensor, for timing loops
        self._keras = keras

    @property
    def input_size(self):
        """(H, W) of the model input, pixels."""
        return self.input_shape[:2]

    def predict(self, images):
        """Depth of (B, H, W, 3) float32 [0, 1] images -> (B, H, W, 1) float32 metres."""
        images = _check_images(images, self.input_size, self.source)
        return np.asarray(self.forward(images))


def depth_only_model(model):
    """The single-output depth model of ``model`` (``mdekd.models.inference_model`` for dict outputs)."""
    if isinstance(model.output, dict):
        from mdekd.models import inference_model

        return inference_model(model)
    return model


def load_keras_model(path):
    """Load a ``.keras`` file saved by mdekd, naming the file in every error.

    Importing ``mdekd.models`` registers the custom layers first (toolchain.md §10); a deserialisation
    error that names an unknown class is reported as "import mdekd / install the package".
    """
    import keras

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Keras model not found: {path}")
    try:
        import mdekd.models  # noqa: F401  (registers the custom layers)
    except ImportError:
        pass
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises TypeError/ValueError/zipfile errors alike
        message = str(error)
        unknown = re.search(r"Could not locate (?:class|function) '([^']+)'", message)
        if unknown:
            raise ValueError(
                f"{path}: the model uses the custom layer {unknown.group(1)!r}, which is not "
                f"registered; import mdekd (install the package: pip install -e .) before loading it"
            ) from error
        first_line = message.strip().splitlines()[0] if message.strip() else ""
        raise ValueError(
            f"{path}: not a loadable .keras model ({type(error).__name__}: {first_line})"
        ) from error


def load_depth_model(path):
    """``load_keras_model``, then ValueError naming ``--model`` unless it is a depth model of mdekd
    (a dict output with ``depth``)."""
    model = load_keras_model(path)
    if not isinstance(model.output, dict) or "depth" not in model.output:
        raise ValueError(f"--model: {path} is not a depth model of mdekd (expected a dict output "
                         f"with 'depth', found {getattr(model, 'output_names', None) or model.output})")
    return model


def load_depth_runner(model, num_threads=DEFAULT_NUM_THREADS):
    """A runner for ``model``: a runner (returned as is), a ``keras.Model``, or a .keras/.tflite path."""
    if isinstance(model, (TFLiteRunner, KerasRunner)):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if path.endswith(".tflite"):
            return TFLiteRunner(path, num_threads=num_threads)
        if path.endswith(".keras"):
            return KerasRunner(path)
        raise ValueError(f"{path}: expected a .keras or .tflite model file")
    return KerasRunner(model)


def _check_images(images, input_size, source):
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or tuple(images.shape[1:]) != (*input_size, 3):
        raise ValueError(
            f"{source}: expected images (B, {input_size[0]}, {input_size[1]}, 3), "
            f"found {images.shape}"
        )
    return images
