"""Where the student's time goes, stage by stage, in TFLite fp32 and int8 (LiteRT, XNNPACK).

The pip LiteRT has no per-op profiler (``benchmark_model --enable_op_profiling`` is a separate
binary), so this profiles by prefixes: the deployed graph (``mdekd.models.deploy_model``, what
export converts) is cut after the encoder, after every decoder step (5×5 depthwise + BN + ReLU,
1×1 conv + BN + ReLU, ×2 upsampling, skip addition), after the head and at the output; each prefix
is converted (fp32, and int8 calibrated on synthetic scenes) and timed, all of them interleaved, and
a stage's cost is its prefix's median minus the previous prefix's. Differences of medians are noisy
(a fraction of a millisecond; a stage can come out slightly negative), the sum is the whole model.

    python -m benchmark.stage_profile                          # FastDepth, 480×640, 2 threads
    python -m benchmark.stage_profile --model runs/x/best.keras --runs 30

Weights: the trained ``--model`` (rebuilt at --height × --width), else random with BatchNorm
statistics estimated on synthetic scenes (``benchmark.latency``).
"""

import numpy as np
from absl import app, flags

from benchmark import common
from mdekd.cli import command

FLAGS = flags.FLAGS
MODES = {"fp32": "none", "int8": "int8"}  # column label -> mdekd.quantization mode name
# decoder layer-name endings after which a stage ends (mdekd.models.student._decoder_stage)
STAGE_ENDS = {"_dw_relu": "5×5 depthwise + BN + ReLU", "_pw_relu": "1×1 conv + BN + ReLU",
              "_up": "×2 upsampling", "_skip": "skip addition"}


def define_flags():
    flags.DEFINE_string("model", None, "Trained student (.keras); default: random weights (--student_encoder ...).")
    common.define_network_flags()
    flags.DEFINE_integer("height", 480, "Input height (multiple of 32).")
    flags.DEFINE_integer("width", 640, "Input width (multiple of 32).")
    flags.DEFINE_integer("threads", 2, "LiteRT threads.", lower_bound=1)
    flags.DEFINE_integer("runs", 20, "Timed runs per prefix and mode.", lower_bound=1)
    flags.DEFINE_integer("num_calibration", 8, "Synthetic scenes for the int8 calibration.", lower_bound=1)
    flags.DEFINE_string("output_dir", common.DEFAULT_OUTPUT_DIR, "Where stage_profile.md/.json go.")


def stage_cuts(network):
    """``[(stage description, tensor)]`` of a deployed student in execution order: the tensor that
    ends each stage, the last one the model's output."""
    import keras

    cuts = []
    for previous, layer in zip(network.layers, network.layers[1:]):
        # the encoder (a nested model, whose ``.output`` is its own graph's) ends where the first
        # layer after it, the attention or decode1, takes the stride-32 map
        if isinstance(previous, keras.Model):
            cuts.append(("encoder", layer.input))
        if layer.name.endswith("_attention"):
            cuts.append((layer.name, layer.output))
        elif layer.name == "head_bn":
            cuts.append(("head: 1×1 conv + BN", layer.output))
        else:
            for ending, description in STAGE_ENDS.items():
                if layer.name.endswith(ending):
                    cuts.append((f"{layer.name[:-len(ending)]} {description}", layer.output))
    if cuts and cuts[-1][1] is not network.output:
        cuts.append(("tail: upsampling + positive depth", network.output))
    return cuts


def stage_costs(prefix_medians):
    """Per-stage cost from the medians (ms) of nested prefixes: each minus the one before."""
    medians = np.asarray(prefix_medians, dtype=np.float64)
    return np.diff(medians, prepend=0.0)


def profile_stages(model, threads=2, runs=20, calibration=None, log=print):
    """Convert and time every prefix of ``deploy_model(model)`` in each mode; returns the rows
    ``{"stage", "<mode>_prefix_ms", "<mode>_ms"}`` (stage cost) and the op counts per mode."""
    import keras

    from mdekd import export
    from mdekd.models import deploy_model
    from mdekd.tflite_runner import TFLiteRunner

    network = deploy_model(model)
    cuts = stage_cuts(network)
    runners = {}
    for index, (stage, tensor) in enumerate(cuts):
        prefix = keras.Model(network.input, tensor, name=f"prefix{index}")
        for label, mode in MODES.items():
            log(f"converting prefix {index + 1}/{len(cuts)} ({stage}) {label}")
            tflite = export.convert(prefix, mode, calibration if mode == "int8" else None)
            runners[(index, label)] = TFLiteRunner(tflite, num_threads=threads)
    image = np.random.default_rng(0).random((1, *network.input_shape[1:]), dtype=np.float32)
    timings = common.time_interleaved(runners, image, runs)
    rows = [{"stage": stage} for stage, _ in cuts]
    for label in MODES:
        medians = [float(np.median(timings[(i, label)])) * 1e3 for i in range(len(cuts))]
        for row, median, cost in zip(rows, medians, stage_costs(medians)):
            row[f"{label}_prefix_ms"], row[f"{label}_ms"] = median, float(cost)
    ops = {label: export.list_ops(runners[(len(cuts) - 1, label)].model_bytes) for label in MODES}
    return rows, ops


def format_rows(rows):
    """Markdown rows: stage, fp32 ms, int8 ms, int8 ÷ fp32 (speed-up; '—' for stages under 0.2 ms)."""
    table = []
    for row in rows:
        fp32, int8 = row["fp32_ms"], row["int8_ms"]
        ratio = common.fmt(fp32 / int8, 2) + "×" if min(fp32, int8) >= 0.2 else "—"
        table.append([row["stage"], common.fmt(fp32, 1), common.fmt(int8, 1), ratio])
    total = [rows[-1]["fp32_prefix_ms"], rows[-1]["int8_prefix_ms"]]
    table.append(["**whole model**", common.fmt(total[0], 1), common.fmt(total[1], 1),
                  common.fmt(total[0] / total[1], 2) + "×"])
    return table


@command("benchmark.stage_profile")
def main(argv):
    from benchmark.latency import build_model, calibration_images
    from mdekd.atomic import prepare_directory
    from mdekd.models.deploy import at_input_size
    from mdekd.tflite_runner import load_keras_model

    common.quiet_tensorflow()
    prepare_directory(FLAGS.output_dir, "--output_dir")
    size = (FLAGS.height, FLAGS.width)
    calibration = calibration_images(FLAGS.num_calibration, size)
    if FLAGS.model:
        model = load_keras_model(FLAGS.model)
        if tuple(model.input_shape[1:3]) != size:
            model = at_input_size(model, size)
        source = FLAGS.model
    else:
        config = {**common.network_config(FLAGS), "height": size[0], "width": size[1]}
        model = build_model("student", config, images=calibration)
        source = f"{common.student_tag(config)}, random weights, BatchNorm statistics from synthetic scenes"
    rows, ops = profile_stages(model, threads=FLAGS.threads, runs=FLAGS.runs, calibration=calibration)
    table = common.markdown_table(["stage", "fp32 ms", "int8 ms", "int8 speed-up"], format_rows(rows))
    notes = [f"Student {source} at {size[0]}x{size[1]}, {FLAGS.threads} LiteRT threads, median of {FLAGS.runs} "
             f"interleaved runs per prefix; stage = its prefix's median minus the previous one's."]
    payload = {"model": source, "size": list(size), "threads": FLAGS.threads, "runs": FLAGS.runs,
               "machine": common.machine_info(), "stages": rows, "ops": ops}
    common.write_results(FLAGS.output_dir, "stage_profile", table, payload, notes)


if __name__ == "__main__":
    define_flags()
    app.run(main)
