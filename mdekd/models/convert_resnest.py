"""Convert timm ResNeSt weights (.safetensors) into a Keras ``.weights.h5`` for ``build_resnest``.

    python -m mdekd.models.convert_resnest --input resnest101e.safetensors --variant resnest101 \\
        --output resnest101.weights.h5

The output loads into the teacher with ``build_teacher(..., encoder_weights="resnest101.weights.h5")``
(``build_teacher`` also reads the .safetensors directly; converting once skips the torch-layout
mapping at every start).
"""

import os

from mdekd.atomic import atomic_path, prepare_file
from mdekd.cli import command

from mdekd.models.resnest import build_resnest
from mdekd.models.timm_weights import load_timm_resnest_weights

WEIGHTS_SUFFIX = ".weights.h5"  # Keras 3 save_weights requires it


def convert_resnest_weights(input_path, variant, output_path):
    """Build ``variant``, load the timm tensors from ``input_path``, write ``output_path`` atomically.

    Returns the encoder with the weights loaded.
    """
    output_path = os.fspath(output_path)
    if not output_path.endswith(WEIGHTS_SUFFIX):
        raise ValueError(f"--output must end with {WEIGHTS_SUFFIX}, got {output_path!r}")
    prepare_file(output_path, "--output")
    encoder = build_resnest(variant)
    load_timm_resnest_weights(encoder, input_path)
    with atomic_path(output_path) as temporary:
        encoder.save_weights(temporary, overwrite=True)
    return encoder


def _define_flags():
    from absl import flags

    from mdekd.models.resnest import RESNEST_VARIANTS

    flags.DEFINE_string("input", None, "timm ResNeSt state_dict (.safetensors).", required=True)
    flags.DEFINE_enum("variant", "resnest101", list(RESNEST_VARIANTS), "ResNeSt variant of the weights.")
    flags.DEFINE_string("output", None, "Keras weights file to write (.weights.h5).", required=True)


@command("mdekd.models.convert_resnest")
def main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    convert_resnest_weights(FLAGS.input, FLAGS.variant, FLAGS.output)
    print(f"{FLAGS.input} -> {FLAGS.output} ({FLAGS.variant})")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    _define_flags()
    app.run(main)
