"""Inference latency of the student and the teacher: Keras (tf.function) and TFLite fp32, fp16,
dynamic-range and int8 under LiteRT (XNNPACK), per thread count, with the achieved GMAC/s and its
ratio to an sgemm peak measured in the same process.

    python -m benchmark.latency                      # 480×640, student + teacher, 1 and 2 threads
    python -m benchmark.latency --models student --runs 50 --threads 2
    python -m benchmark.latency --models student --extra_students mobilevit_xs,mobilevit_xs+dual
    python -m benchmark.latency --smoke              # tiny sizes, seconds (used by the tests)

How it measures:
- Weights are random (seeded): latency does not depend on their values. The BatchNorm statistics
  are estimated on synthetic scenes (``mdekd.data.synthetic``, one training-mode pass) so the
  activation ranges look like a trained network's; the int8 activation ranges are calibrated on
  the same scenes. (With the raw init statistics, the int8 student's largest skip ADD falls
  outside XNNPACK's scale limits and runs in a slow builtin kernel: ~9 ms more at 1 thread.)
- The parent builds every model, converts and saves each variant once (``--work_dir`` keeps them
  for a later run). Each thread count is then timed in its own child process, because TF's
  intra-op pool and numpy's OpenBLAS pool are fixed when a process starts: the child sets TF to
  T intra-op threads (inter-op 1), starts OpenBLAS with ``OPENBLAS_NUM_THREADS=T``, and gives
  LiteRT ``num_threads=T``.
- One timed run = one batch-1 forward pass including the input copy: ``runner(image)`` of the
  LiteRT signature runner, or the ``tf.function`` call plus ``.numpy()`` for Keras. ``--warmup``
  untimed runs first; the median and p90 of ``--runs`` runs are reported (``--teacher_runs`` for
  the teacher, which is ~40× slower). All variants are loaded at once and timed in turns of 5
  runs each (after one untimed run), so load from other processes falls on all of them alike.
- sgemm peak: numpy float32 ``a @ b`` of 2048×2048 matrices (OpenBLAS, best of 10, measured
  before and after the models, the larger kept) in the same child, so with the same thread count; MACs of the model (``mdekd.models.count_macs``: conv and
  dense layers) / median latency gives its achieved GMAC/s.
"""

import json
import os
import tempfile
import time

from absl import app, flags

from benchmark import common
from mdekd.quantization import LABELS, mode_of_label

FLAGS = flags.FLAGS

MODEL_NAMES = ("student", "teacher")
VARIANTS = ("keras", *LABELS)  # keras (tf.function) + the TFLite modes of mdekd.quantization, by label
UPSAMPLING_VARIANTS = ("fp32", "int8")  # nearest vs bilinear student, toolchain.md §5
# Images per training-mode pass that sets the BN statistics (the teacher's activations at
# 480×640 take ~1 GB per image in training mode).
BATCHNORM_IMAGES = {"student": 8, "teacher": 2}
BLOCK_RUNS = 5  # consecutive timed runs of one variant before the next variant's turn
# Targets of the issue, at 480×640 with 2 threads, in the same run.
TARGET_INT8_OVER_FP32 = 3.0
TARGET_FP32_OVER_KERAS = 1.5
TARGET_FP32_SGEMM_FRACTION = 0.60


def define_flags():
    """Command-line flags (defined only when run as a program, so modules import side-effect free)."""
    flags.DEFINE_list("models", list(MODEL_NAMES), "Models to time: student, teacher.")
    flags.DEFINE_list("variants", list(VARIANTS), "Student variants: keras (tf.function), TFLite fp32, fp16, dynamic, int8.")
    flags.DEFINE_list("teacher_variants", list(VARIANTS), "Teacher variants (each teacher conversion takes ~1 min at 480x640).")
    flags.DEFINE_integer("height", 480, "Input height (multiple of 32).")
    flags.DEFINE_integer("width", 640, "Input width (multiple of 32).")
    flags.DEFINE_integer("runs", 30, "Timed runs per student variant.", lower_bound=1)
    flags.DEFINE_integer("teacher_runs", 5, "Timed runs per teacher variant (it is ~40x slower).", lower_bound=1)
    flags.DEFINE_integer("warmup", 3, "Untimed runs before timing.", lower_bound=0)
    flags.DEFINE_string("threads", "1,2", "Comma-separated thread counts (LiteRT, TF intra-op, OpenBLAS).")
    flags.DEFINE_bool("compare_upsampling", True, "Also time the student with nearest upsampling (fp32, int8).")
    flags.DEFINE_list("extra_students", [], "More students timed in the same run (--variants), each "
                      "'<encoder>' or '<encoder>+<attention>', e.g. mobilevit_xs,mobilevit_xs+dual.")
    flags.DEFINE_integer("num_calibration", 8, "Synthetic scenes for the int8 calibration.", lower_bound=1)
    flags.DEFINE_integer("sgemm_size", common.SGEMM_SIZE, "Matrix size of the sgemm peak.", lower_bound=64)
    flags.DEFINE_string("output_dir", common.DEFAULT_OUTPUT_DIR, "Where latency.md/.json go.")
    flags.DEFINE_string("work_dir", None, "Keep the converted models here (reused if present); default: a temp dir.")
    flags.DEFINE_bool("smoke", False, "Tiny run: 64x64, student alpha 0.25 (keras, fp32, int8), resnest14 teacher "
                      "(keras, fp32), 2 runs, 1 thread.")
    common.define_network_flags()
    common.define_worker_flags()
    flags.adopt_module_key_flags(common)


# ---------------------------------------------------------------------------------------------
# Parent: build, convert, save


def calibration_images(count, size, seed=0):
    """Synthetic scenes (H, W, 3) float32 in [0, 1] for the int8 activation ranges."""
    import numpy as np

    from mdekd.data.synthetic import render_scene

    return [render_scene((seed, i), *size)[0].astype(np.float32) / 255.0 for i in range(count)]


def estimate_batchnorm_statistics(model, images):
    """Set every BatchNorm's moving mean/variance to the batch statistics of ``images``.

    A freshly built network has moving mean 0 and variance 1 everywhere, so its activations
    drift by orders of magnitude from layer to layer; a trained one's do not. With the raw
    statistics, the int8 calibration sees the decoder branch and its skip differ in scale by
    more than XNNPACK accepts for a quantised ADD (input/output scale ratio), that ADD falls
    back to the single-threaded builtin kernel and int8 looks slower than it is. One forward
    pass in training mode with momentum 0 gives trained-like ranges without training.
    """
    import keras

    from mdekd.models.common import iter_layers

    norms = [layer for layer in iter_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum


def build_model(name, config, upsampling="bilinear", images=None):
    """Random-weight student or teacher; BN statistics estimated on ``images`` when given."""
    import keras
    import numpy as np

    from mdekd.models import build_student, build_teacher

    keras.utils.set_random_seed(0)
    shape = (config["height"], config["width"], 3)
    if name == "teacher":
        model = build_teacher(shape, encoder=config["teacher_encoder"],
                              decoder_channels=config["teacher_decoder_channels"])
    else:
        model = build_student(shape, upsampling=upsampling, **common.student_options(config))
    if images is not None:
        batch = BATCHNORM_IMAGES["teacher" if name == "teacher" else "student"]
        estimate_batchnorm_statistics(model, np.stack(images[:batch]))
    return model


def prepare_models(config, work_dir, log=print):
    """Build, save and convert every model variant into ``work_dir``; returns the entry list.

    Files are named by model, configuration and size, and reused when already there.
    """
    from mdekd import export
    from mdekd.models import count_macs, trainable_parameter_count
    from mdekd.models.student import student_name

    size = (config["height"], config["width"])
    # (network, label, upsampling, variants, config of that network)
    jobs = [(name, name, "bilinear", config["teacher_variants" if name == "teacher" else "variants"], config)
            for name in config["models"]]
    if config["compare_upsampling"] and "student" in config["models"]:
        jobs.append(("student", "student_nearest", "nearest", list(UPSAMPLING_VARIANTS), config))
    for spec in config.get("extra_students", []):
        encoder, _, attention = spec.partition("+")
        student = {**config, "student_encoder": encoder, "decoder_attention": attention}
        jobs.append(("student", student_name(encoder, attention or None), "bilinear", config["variants"], student))
    calibration = None
    entries = []
    for name, label, upsampling, variants, job_config in jobs:
        tag = (common.student_tag(job_config) if name == "student"
               else f"{config['teacher_encoder']}_dc{config['teacher_decoder_channels']}") + "_bnstats"
        stem = os.path.join(work_dir, f"{label}_{tag}_{size[0]}x{size[1]}")
        model = None
        if os.path.isfile(stem + ".info.json"):
            with open(stem + ".info.json") as f:
                info = json.load(f)
        else:
            log(f"building {label} at {size[0]}x{size[1]} (random weights)")
            calibration = calibration or calibration_images(config["num_calibration"], size)
            model = build_model(name, job_config, upsampling, calibration)
            info = {"params": trainable_parameter_count(model), "macs": count_macs(model)}
            common.write_atomically(stem + ".info.json", json.dumps(info))
        for variant in variants:
            path = f"{stem}_{variant}.{'keras' if variant == 'keras' else 'tflite'}"
            if not os.path.isfile(path):
                if model is None:
                    calibration = calibration or calibration_images(config["num_calibration"], size)
                    model = build_model(name, job_config, upsampling, calibration)
                start = time.perf_counter()
                if variant == "keras":
                    model.save(path)
                else:
                    mode = mode_of_label(variant)
                    tflite = export.convert(model, mode.name, calibration if mode.integer_only else None)
                    export.write_atomically(path, tflite)
                log(f"prepared {label} {variant} in {time.perf_counter() - start:.0f} s")
            entries.append({
                "model": label, "network": name, "upsampling": upsampling, "variant": variant,
                "path": path, "size_bytes": os.path.getsize(path), **info,
            })
    return entries


# ---------------------------------------------------------------------------------------------
# Worker: one thread count, one process


def run_worker(spec_path, output_path):
    """Time every entry of the spec in this process (thread pools fixed here); write JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    threads = spec["threads"]
    import numpy as np  # OpenBLAS starts with OPENBLAS_NUM_THREADS=threads (set by the parent)

    sgemm_before = common.sgemm_gmacs(spec["sgemm_size"])
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from mdekd.tflite_runner import KerasRunner, TFLiteRunner

    rng = np.random.default_rng(0)
    prepared = []
    for entry in spec["entries"]:
        runs = spec["teacher_runs"] if entry["network"] == "teacher" else spec["runs"]
        if entry["variant"] == "keras":
            runner = KerasRunner(entry["path"])
            image = tf.constant(rng.random((1, *runner.input_shape), dtype=np.float32))
            run_once = (lambda forward, image: lambda: forward(image).numpy())(runner.forward, image)
        else:
            runner = TFLiteRunner(entry["path"], num_threads=threads)
            image = rng.random((1, *runner.input_shape), dtype=np.float32)
            run_once = (lambda runner, image: lambda: runner.run_one(image))(runner, image)
        for _ in range(spec["warmup"]):
            run_once()
        prepared.append((entry, runs, run_once, []))
    # Interleaved in blocks of BLOCK_RUNS runs per variant (after one untimed run that brings its
    # weights back into the caches), so that load from other processes, which comes and goes,
    # falls on all variants alike and their ratios stay fair.
    while any(len(seconds) < runs for _, runs, _, seconds in prepared):
        for entry, runs, run_once, seconds in prepared:
            todo = min(BLOCK_RUNS, runs - len(seconds))
            if todo <= 0:
                continue
            run_once()
            for _ in range(todo):
                start = time.perf_counter()
                run_once()
                seconds.append(time.perf_counter() - start)
    results = [{**entry, "threads": threads, **common.timing_stats(seconds)}
               for entry, _, _, seconds in prepared]
    # Measured before and after the models: the larger of the two is the less disturbed one.
    sgemm = max(sgemm_before, common.sgemm_gmacs(spec["sgemm_size"]))
    payload = {"threads": threads, "sgemm_gmacs": sgemm, "sgemm_size": spec["sgemm_size"],
               "results": results, "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    common.write_atomically(output_path, json.dumps(payload, indent=2))


# ---------------------------------------------------------------------------------------------
# Report


def derive(results, sgemm_by_threads):
    """Add achieved GMAC/s and its fraction of the same-thread sgemm peak to every result."""
    for r in results:
        r["gmacs_per_s"] = r["macs"] / (r["median_ms"] / 1e3) / 1e9
        r["sgemm_gmacs"] = sgemm_by_threads[r["threads"]]
        r["sgemm_fraction"] = r["gmacs_per_s"] / r["sgemm_gmacs"]
    return results


def check_targets(results):
    """The issue's latency targets for the student (bilinear) at the largest thread count timed."""
    student = [r for r in results if r["model"] == "student"]
    if not student:
        return []
    threads = max(r["threads"] for r in student)
    by_variant = {r["variant"]: r for r in student if r["threads"] == threads}
    checks = []

    def add(name, value, target, note):
        checks.append({"check": name, "threads": threads, "value": value, "target": target,
                       "met": value >= target, "note": note})

    if "int8" in by_variant and "fp32" in by_variant:
        add("int8 speed-up over fp32 TFLite", by_variant["fp32"]["median_ms"] / by_variant["int8"]["median_ms"],
            TARGET_INT8_OVER_FP32, "median latency ratio")
    if "fp32" in by_variant and "keras" in by_variant:
        add("fp32 TFLite speed-up over Keras", by_variant["keras"]["median_ms"] / by_variant["fp32"]["median_ms"],
            TARGET_FP32_OVER_KERAS, "median latency ratio")
    if "fp32" in by_variant:
        add("fp32 TFLite fraction of sgemm GMAC/s", by_variant["fp32"]["sgemm_fraction"],
            TARGET_FP32_SGEMM_FRACTION, "conv/dense MACs / median latency vs numpy sgemm")
    return checks


def format_report(results, checks, sgemm_by_threads, config):
    rows = [
        [r["model"], r["variant"], r["threads"], common.fmt(r["median_ms"], 1), common.fmt(r["p90_ms"], 1),
         r["runs"], common.fmt(r["size_bytes"] / 1e6, 2), common.fmt(r["params"] / 1e6, 2),
         common.fmt(r["macs"] / 1e9, 2), common.fmt(r["gmacs_per_s"], 1),
         common.fmt(100 * r["sgemm_fraction"], 0)]
        for r in results
    ]
    table = common.markdown_table(
        ["model", "variant", "threads", "median ms", "p90 ms", "runs", "size MB", "params M",
         "GMACs", "GMAC/s", "% sgemm"], rows)
    notes = [f"Input 1×{config['height']}×{config['width']}×3, random weights; sgemm peak (numpy "
             f"float32 {config['sgemm_size']}² matmul, same process and thread count): "
             + ", ".join(f"{t} thread{'s' if t > 1 else ''} {g:.1f} GMAC/s" for t, g in sorted(sgemm_by_threads.items()))
             + "."]
    if checks:
        notes.append("")
        notes.append(common.markdown_table(
            ["target (student, bilinear)", "threads", "measured", "target", "met"],
            [[c["check"], c["threads"], common.fmt(c["value"], 2), f">= {c['target']}", "yes" if c["met"] else "NO"]
             for c in checks]))
    return table, notes


def benchmark_latency(config, output_dir, work_dir=None, log=print):
    """Run the whole benchmark; returns the payload written to ``<output_dir>/latency.json``."""
    machine = common.machine_info()
    with tempfile.TemporaryDirectory(prefix="mdekd-latency-") as temporary:
        models_dir = work_dir or temporary
        os.makedirs(models_dir, exist_ok=True)
        entries = prepare_models(config, models_dir, log=log)
        results, sgemm_by_threads, loads = [], {}, {}
        for threads in config["threads"]:
            spec = {**{k: config[k] for k in ("runs", "teacher_runs", "warmup", "sgemm_size")},
                    "threads": threads, "entries": entries}
            spec_path = os.path.join(temporary, f"spec_{threads}.json")
            out_path = os.path.join(temporary, f"timings_{threads}.json")
            common.write_atomically(spec_path, json.dumps(spec))
            log(f"timing {len(entries)} variants with {threads} thread(s) "
                f"(load average {os.getloadavg()[0]:.2f})")
            common.run_child("benchmark.latency", ["--worker", spec_path, "--worker_output", out_path],
                             threads=threads)
            with open(out_path) as f:
                timings = json.load(f)
            sgemm_by_threads[threads] = timings["sgemm_gmacs"]
            loads[threads] = timings["load_average_after"]
            results += timings["results"]
    results = derive(results, sgemm_by_threads)
    checks = check_targets(results)
    table, notes = format_report(results, checks, sgemm_by_threads, config)
    notes.append(f"Machine: {machine['cpu']}, {machine['cpu_count']} cores; load average before "
                 f"{machine['load_average']}, after each thread count {loads}.")
    payload = {"config": config, "machine": machine, "sgemm_gmacs": sgemm_by_threads,
               "results": [{k: v for k, v in r.items() if k != "path"} for r in results],
               "targets": checks, "load_average_after": loads}
    common.write_results(output_dir, "latency", table, payload, notes)
    return payload


def config_from_flags():
    config = {
        "models": FLAGS.models, "variants": FLAGS.variants, "teacher_variants": FLAGS.teacher_variants,
        "height": FLAGS.height, "width": FLAGS.width,
        "runs": FLAGS.runs, "teacher_runs": FLAGS.teacher_runs, "warmup": FLAGS.warmup,
        "threads": common.parse_int_list(FLAGS.threads, "threads"),
        "compare_upsampling": FLAGS.compare_upsampling, **common.network_config(FLAGS),
        "extra_students": FLAGS.extra_students,
        "num_calibration": FLAGS.num_calibration, "sgemm_size": FLAGS.sgemm_size,
    }
    if FLAGS.smoke:
        config.update(height=64, width=64, runs=2, teacher_runs=2, warmup=1, threads=[1],
                      student_alpha=0.25, teacher_encoder="resnest14", teacher_decoder_channels=16,
                      num_calibration=2, sgemm_size=256)
        if not FLAGS["variants"].present:
            config["variants"] = ["keras", "fp32", "int8"]
        if not FLAGS["teacher_variants"].present:
            config["teacher_variants"] = ["keras", "fp32"]
    from mdekd.models.student import check_student_options

    for spec in config["extra_students"]:
        encoder, _, attention = spec.partition("+")
        check_student_options(encoder, attention, names=("--extra_students", "--extra_students"))
    unknown = (sorted(set(config["models"]) - set(MODEL_NAMES))
               + sorted(set(config["variants"] + config["teacher_variants"]) - set(VARIANTS)))
    if unknown:
        raise ValueError(f"--models/--variants: unknown {', '.join(unknown)}; models are "
                         f"{', '.join(MODEL_NAMES)}, variants {', '.join(VARIANTS)}")
    return config


main = common.worker_benchmark_main(
    "benchmark.latency", lambda: benchmark_latency(config_from_flags(), FLAGS.output_dir, FLAGS.work_dir),
    run_worker)


if __name__ == "__main__":
    define_flags()
    app.run(main)
