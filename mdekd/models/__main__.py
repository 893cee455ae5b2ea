"""Print trainable parameters and GMACs per stage of the student or the teacher.

    python -m mdekd.models --summary student --height 480 --width 640
    python -m mdekd.models --summary student --student_encoder mobilevit_xs --decoder_attention dual
    python -m mdekd.models --summary teacher --height 480 --width 640 --encoder resnest101

Models are built with random weights for the given input size; nothing runs through them.
"""

import os

from mdekd.cli import command


def _define_flags():
    from absl import flags

    from mdekd.models.student import UPSAMPLING_MODES

    flags.DEFINE_enum("summary", None, ["student", "teacher"], "Which model to summarise.", required=True)
    flags.DEFINE_integer("height", 480, "Input height (multiple of 32).")
    flags.DEFINE_integer("width", 640, "Input width (multiple of 32).")
    flags.DEFINE_string("encoder", "resnest101", "Teacher encoder: a ResNeSt variant.")
    flags.DEFINE_integer("decoder_channels", 256, "Teacher decoder width.")
    flags.DEFINE_string("student_encoder", "mobilenet", "Student encoder (a key of STUDENT_ENCODERS).")
    flags.DEFINE_string("decoder_attention", "", "Student decoder attention: '' (none) or 'dual'.")
    flags.DEFINE_float("alpha", 1.0, "Student width multiplier.")
    flags.DEFINE_enum("upsampling", "bilinear", list(UPSAMPLING_MODES), "Student decoder upsampling.")


@command("mdekd.models")
def main(argv):
    from absl import flags

    from mdekd.models import build_student, build_teacher, cost_table
    from mdekd.models.student import check_student_options

    FLAGS = flags.FLAGS
    input_shape = (FLAGS.height, FLAGS.width, 3)
    if FLAGS.summary == "student":
        check_student_options(FLAGS.student_encoder, FLAGS.decoder_attention,
                              names=("--student_encoder", "--decoder_attention"))
        model = build_student(input_shape, encoder=FLAGS.student_encoder, decoder_attention=FLAGS.decoder_attention,
                              upsampling=FLAGS.upsampling, alpha=FLAGS.alpha)
        title = f"student {model.name} (alpha={FLAGS.alpha}, {FLAGS.upsampling})"
    else:
        model = build_teacher(input_shape, encoder=FLAGS.encoder, decoder_channels=FLAGS.decoder_channels)
        title = f"teacher {FLAGS.encoder} + fusion decoder ({FLAGS.decoder_channels} channels)"
    print(f"{title} at {FLAGS.height}x{FLAGS.width}")
    print(cost_table(model))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    _define_flags()
    app.run(main)
