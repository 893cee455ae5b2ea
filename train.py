"""Train the teacher, the student directly, or the student by distillation.

    python train.py --flagfile=configs/quickstart_teacher.cfg
    python train.py --flagfile=configs/quickstart_distill.cfg --teacher=runs/quickstart_teacher/best.keras

Every flag is a field of ``mdekd.train_config.TrainConfig``; see ``--helpfull``.
"""

import sys

from absl import app, flags

from mdekd import distill, train_config, training
from mdekd.callbacks import NonFiniteLossError
from mdekd.cli import command
from mdekd.models.student import DEPTH_OUTPUTS, UPSAMPLING_MODES
from mdekd.schedules import SCHEDULES

_D = train_config.TrainConfig()
FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", _D.mode, train_config.MODES,
                  "teacher: train the teacher alone; student: the student alone (direct training); "
                  "distill: the student from a frozen --teacher.")
flags.DEFINE_string("output_dir", None, "Run folder (default runs/<mode>).")
flags.DEFINE_string("dataset", _D.dataset, "mai2021 | folder | kitti | nyu | synthetic.")
flags.DEFINE_string("data_dir", _D.data_dir, "Dataset root (synthetic: generated here if absent).")
flags.DEFINE_float("depth_scale", None, "Metres per depth PNG unit for --dataset=folder.")
flags.DEFINE_integer("synthetic_train", _D.synthetic_train, "Synthetic training frames.")
flags.DEFINE_integer("synthetic_validation", _D.synthetic_validation, "Synthetic validation frames.")
flags.DEFINE_integer("height", _D.height, "Input height (multiple of 32).")
flags.DEFINE_integer("width", _D.width, "Input width (multiple of 32).")
flags.DEFINE_bool("augment", _D.augment, "Joint geometric + photometric augmentation.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size.")
flags.DEFINE_integer("epochs", _D.epochs, "Epochs of --steps_per_epoch steps.")
flags.DEFINE_integer("steps_per_epoch", _D.steps_per_epoch,
                     "Steps per epoch = checkpoint interval (0: one pass over the training set).")
flags.DEFINE_integer("validation_steps", _D.validation_steps, "0: the whole validation split.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Peak AdamW learning rate.")
flags.DEFINE_float("weight_decay", _D.weight_decay, "AdamW weight decay.")
flags.DEFINE_enum("schedule", _D.schedule, SCHEDULES, "Learning-rate schedule.")
flags.DEFINE_integer("warmup_steps", _D.warmup_steps, "Linear warm-up steps (cosine).")
flags.DEFINE_float("lambda_si", _D.lambda_si, "Weight of the scale-invariant loss.")
flags.DEFINE_float("lambda_gml", _D.lambda_gml, "Weight of the gradient matching loss.")
flags.DEFINE_float("lambda_d", _D.lambda_d, "Weight of the pairwise distillation loss.")
flags.DEFINE_float("lambda_response", _D.lambda_response,
                   "Weight of response distillation: SI loss of the student's depth against the "
                   "teacher's over every pixel, labelled or not.")
flags.DEFINE_float("variance_focus", _D.variance_focus,
                   "λ of the SI loss, mean(g²) − λ·mean(g)²: 1 = scale-invariant (the paper's form), "
                   "< 1 also fixes the scale so the network predicts metres.")
flags.DEFINE_enum("feature_activation", _D.feature_activation,
                  ["" if a is None else a for a in distill.FEATURE_ACTIVATIONS],
                  "Compare distilled maps as output ('', the paper) or after a ReLU on both sides.")
flags.DEFINE_string("unlabeled_dir", _D.unlabeled_dir,
                    "Folder of photos without depth (recursive, any size): distillation terms only.")
flags.DEFINE_float("unlabeled_ratio", _D.unlabeled_ratio,
                   "Exact share of each batch drawn from --unlabeled_dir, in [0, 1).")
flags.DEFINE_bool("teacher_cache", _D.teacher_cache,
                  "Compute the teacher's targets once per frame (needs --noaugment).")
flags.DEFINE_list("distill_strides", list(_D.distill_strides),
                  f"Distilled teacher/student pairs, a subset of {list(distill.DISTILL_STRIDES)}.")
flags.DEFINE_string("pool_scale", str(_D.pool_scale),
                    "Node grid of the pairwise loss as a fraction of the map ('none' = every pixel); "
                    "one value, or per stride as 'stride16:none,stride8:0.5,...'.")
flags.DEFINE_string("teacher", _D.teacher, "Teacher .keras file, or teacher weights (distill mode).")
flags.DEFINE_string("teacher_encoder", _D.teacher_encoder, "ResNeSt variant of the teacher.")
flags.DEFINE_integer("teacher_decoder_channels", _D.teacher_decoder_channels,
                     "Width of the teacher's fusion decoder (256 in the paper).")
flags.DEFINE_string("student_encoder", _D.student_encoder,
                    "Student encoder: mobilenet (FastDepth) | mobilevit_xxs | mobilevit_xs | mobilevit_s.")
flags.DEFINE_string("decoder_attention", _D.decoder_attention,
                    "Student decoder attention on the stride-32 map: '' (none) | dual (position + channel).")
flags.DEFINE_float("student_alpha", _D.student_alpha, "Width multiplier of the student's encoder and decoder.")
flags.DEFINE_enum("upsampling", _D.upsampling, list(UPSAMPLING_MODES), "Student decoder upsampling.")
flags.DEFINE_enum("depth_output", _D.depth_output, list(DEPTH_OUTPUTS),
                  "Student head activation: softplus (depth ≈ head value) or log (the head predicts "
                  "log depth, so int8 export errs by a fraction of the depth).")
flags.DEFINE_string("encoder_weights", _D.encoder_weights,
                    "Encoder initialisation: empty (random), 'imagenet', or a weights file.")
flags.DEFINE_integer("seed", _D.seed, "Random seed (weights, data order, augmentation).")
flags.DEFINE_enum("distribution", _D.distribution, train_config.DISTRIBUTIONS,
                  "none | mirrored (all local devices) | multi_worker (TF_CONFIG).")
flags.DEFINE_bool("sync_batch_norm", _D.sync_batch_norm,
                  "Synchronise BatchNormalization moments across replicas when distributing.")
flags.DEFINE_bool("mixed_precision", _D.mixed_precision,
                  "mixed_float16 training (GPU only); models are saved in float32.")


def config_from_flags():
    """A ``TrainConfig`` from the parsed flags."""
    try:
        pool_scale = train_config.parse_pool_scale(FLAGS.pool_scale)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    values = {field: FLAGS[field].value for field in train_config.TrainConfig.__dataclass_fields__
              if field in FLAGS and field not in ("pool_scale", "distill_strides", "output_dir")}
    return train_config.TrainConfig(
        **values, pool_scale=pool_scale, distill_strides=tuple(FLAGS.distill_strides),
        output_dir=FLAGS.output_dir or f"runs/{FLAGS.mode}")


def _flags_text():
    """This program's flags in flagfile form, so a run can be repeated with --flagfile."""
    own = FLAGS.get_key_flags_for_module(sys.modules[__name__])
    return "".join(f"{flag.serialize()}\n" for flag in own if flag.serialize())


@command("train.py", errors=(NonFiniteLossError,))
def main(argv):
    result = training.run_training(config_from_flags(), flags_text=_flags_text())
    print(f"best: {result['best']}\nlast: {result['last']}")


if __name__ == "__main__":
    app.run(main)
