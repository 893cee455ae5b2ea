"""Every registered student through ``export.export_tflite`` in every quantisation mode.

For each encoder of ``mdekd.models.STUDENT_ENCODERS``, with and without each decoder attention, a
student is built at ``--height x --width`` (random weights, the attention's γ at 0.5 so that it
contributes; BatchNorm statistics at their initial values: with statistics estimated on scenes a
random network's log-depth is so large that even fp16 misses its tolerance, the fidelity problem of
issue 12, which is measured on trained students), saved as ``.keras`` and exported the way ``export.py`` does: converted with builtin
ops only, verified against Keras on held-out synthetic scenes (the mode's tolerance), checked with
the GPU-delegate analyzer. A failed verification is recorded, not raised.

    python -m benchmark.export_students                       # 64x64, alpha 0.25: ~15 min on 2 cores
    python -m benchmark.export_students --students=mobilevit_xs+dual --modes=int8
"""

import itertools
import os
import tempfile
import time

from absl import app, flags

from benchmark import common

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_integer("height", 64, "Student input height (multiple of 32).")
    flags.DEFINE_integer("width", 64, "Student input width (multiple of 32).")
    flags.DEFINE_float("alpha", 0.25, "Width multiplier of every student.")
    flags.DEFINE_string("students", None, "Comma-separated '<encoder>' or '<encoder>+<attention>'; "
                        "default: every registered encoder, with and without each attention.")
    flags.DEFINE_string("modes", None, "Comma-separated quantisation modes; default: all.")
    flags.DEFINE_string("output_dir", "docs/results/students", "Where export_students.md/.json go.")


def registered_students():
    """(encoder, attention) for every registered encoder × {no attention, each attention}."""
    from mdekd.models import DECODER_ATTENTIONS, STUDENT_ENCODERS

    return list(itertools.product(STUDENT_ENCODERS, DECODER_ATTENTIONS))


def parse_students(text):
    """'--students' text -> [(encoder, attention or None)]; UsageError naming the flag and the
    registered names for an unknown one (``check_student_options``)."""
    from mdekd.models.student import check_student_options

    students = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        encoder, _, attention = item.partition("+")
        try:
            check_student_options(encoder, attention or None, names=("--students", "--students"))
        except ValueError as error:
            raise app.UsageError(str(error)) from None
        students.append((encoder, attention or None))
    return students


def export_one(model_path, mode, data_dir):
    """One export's row: passed, deviation, GPU delegate, seconds; the error when it failed."""
    from mdekd import export

    output = model_path.replace(".keras", f"_{mode}.tflite")
    start = time.perf_counter()
    try:
        report = export.export_tflite(model_path, mode, output=output, representative_data=data_dir,
                                      dataset="synthetic", validation_data=data_dir, num_calibration=8,
                                      num_verification=4, progress=False, log=lambda *_: None)
    except export.ExportError as error:
        return {"passed": False, "error": str(error), "seconds": time.perf_counter() - start}
    return {"passed": report["passed"], "seconds": time.perf_counter() - start,
            "mean_relative_diff": report["mean_relative_diff"],
            "p99_relative_diff": report["p99_relative_diff"],
            "forbidden_ops": export.forbidden_ops(report["ops"]),
            "gpu_delegate": report["gpu_delegate"]["summary"]}


def main(argv):
    del argv
    import keras

    from mdekd import quantization
    from mdekd.data import synthetic
    from mdekd.models import build_student

    common.quiet_tensorflow()
    students = parse_students(FLAGS.students) if FLAGS.students else registered_students()
    modes = [m.strip() for m in (FLAGS.modes or ",".join(quantization.NAMES)).split(",") if m.strip()]
    for mode in modes:
        quantization.get_mode(mode)  # an unknown mode fails before anything is built
    start = time.perf_counter()
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="mdekd-export-students-") as work:
        data_dir = os.fspath(synthetic.generate_dataset(os.path.join(work, "scenes"), train=8, validation=4,
                                                        height=FLAGS.height, width=FLAGS.width, progress=False))
        for encoder, attention in students:
            keras.utils.set_random_seed(0)
            model = build_student((FLAGS.height, FLAGS.width, 3), encoder=encoder,
                                  decoder_attention=attention, alpha=FLAGS.alpha)
            if attention:  # γ starts at 0 (the identity); a trained attention contributes
                layer = model.get_layer(f"decoder_{attention}_attention")
                for gamma in (layer.position_gamma, layer.channel_gamma):
                    gamma.assign(0.5)
            model_path = os.path.join(work, f"{model.name}.keras")
            model.save(model_path)
            for mode in modes:
                result = {"student": model.name, "mode": mode, **export_one(model_path, mode, data_dir)}
                results.append(result)
                rows.append([model.name, mode, "yes" if result["passed"] else "NO",
                             common.fmt(result.get("mean_relative_diff"), 4),
                             common.fmt(result.get("p99_relative_diff"), 4),
                             result.get("gpu_delegate", result.get("error", "")), f"{result['seconds']:.0f}"])
                print(" | ".join(rows[-1]), flush=True)
    table = common.markdown_table(["student", "mode", "verified", "mean rel. diff", "p99 rel. diff",
                                   "GPU delegate", "s"], rows)
    config = {"height": FLAGS.height, "width": FLAGS.width, "alpha": FLAGS.alpha, "modes": modes,
              "students": ["+".join(filter(None, s)) for s in students]}
    machine = common.machine_info()
    notes = [f"Input {FLAGS.height}x{FLAGS.width}, alpha {FLAGS.alpha}, random weights; "
             f"{sum(r['passed'] for r in results)}/{len(results)} exports verified; "
             f"wall {(time.perf_counter() - start) / 60:.1f} min on {machine['cpu']}, {machine['cpu_count']} cores."]
    common.write_results(FLAGS.output_dir, "export_students", table,
                         {"config": config, "results": results, "machine": machine}, notes)


if __name__ == "__main__":
    define_flags()
    app.run(main)
