"""Training throughput: images/s of a direct student step, a direct teacher step, a distillation
step, and of the tf.data input pipeline alone, with each configuration's peak memory.

    python -m benchmark.throughput                         # 256×320, batch 8, synthetic scenes
    python -m benchmark.throughput --data_dir data/mai2021 --configs student,distill
    python -m benchmark.throughput --smoke                 # tiny, seconds (used by the tests)

How it measures:
- Every configuration runs in its own child process, so its peak resident memory
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own and not the previous one's.
- Training steps: ``DepthTrainer(student)``, ``DepthTrainer(teacher)`` or
  ``Distiller(teacher=..., student=...)`` compiled with AdamW (``jit_compile`` off, the CPU
  default), fed one fixed batch read from the training split with ``train_on_batch``; so the
  step time excludes input loading, which the ``pipeline`` configuration measures alone
  (``mdekd.data.build_dataset`` with augmentation, shuffling and repeat, as in training).
- ``--warmup`` untimed steps (the first traces the graph), then the median step time over
  ``--steps`` steps; images/s = batch size / median step time. Weights are random.
- Without ``--data_dir``, synthetic scenes (``mdekd.data.synthetic``) are generated into a temp dir.
"""

import json
import os
import resource
import tempfile
import time

from absl import app, flags

from benchmark import common

FLAGS = flags.FLAGS

CONFIGS = ("student", "teacher", "distill", "pipeline")
DESCRIPTIONS = {
    "student": "DepthTrainer(student) train step",
    "teacher": "DepthTrainer(teacher) train step",
    "distill": "Distiller(teacher, student) train step",
    "pipeline": "tf.data pipeline alone (decode, resize, augment, batch)",
}


def define_flags():
    """Command-line flags (defined only when run as a program, so modules import side-effect free)."""
    flags.DEFINE_list("configs", list(CONFIGS), "Configurations: student, teacher, distill, pipeline.")
    flags.DEFINE_integer("height", 256, "Training height (multiple of 32).")
    flags.DEFINE_integer("width", 320, "Training width (multiple of 32).")
    flags.DEFINE_integer("batch_size", 8, "Batch size.", lower_bound=1)
    flags.DEFINE_integer("steps", 10, "Timed steps per configuration.", lower_bound=1)
    flags.DEFINE_integer("warmup", 2, "Untimed steps first (the first one traces the graph).", lower_bound=1)
    flags.DEFINE_string("data_dir", None, "Dataset root; default: synthetic scenes in a temp dir.")
    flags.DEFINE_string("dataset", "mai2021", "Layout of --data_dir.")
    flags.DEFINE_bool("augment", True, "Augmentation in the pipeline configuration (as in training).")
    flags.DEFINE_integer("threads", 0, "TF intra-op threads (0: TF's default, all cores).", lower_bound=0)
    flags.DEFINE_string("output_dir", common.DEFAULT_OUTPUT_DIR, "Where throughput.md/.json go.")
    flags.DEFINE_bool("smoke", False, "Tiny run: 64x64, batch 2, alpha 0.25, resnest14 teacher, 2 steps.")
    common.define_network_flags()
    common.define_worker_flags()
    flags.adopt_module_key_flags(common)


def peak_rss_mb():
    """Peak resident memory of this process, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _networks(spec, kind):
    import keras

    from mdekd.models import build_student, build_teacher

    keras.utils.set_random_seed(0)
    shape = (spec["height"], spec["width"], 3)
    student = build_student(shape, **common.student_options(spec)) if kind in ("student", "distill") else None
    teacher = (build_teacher(shape, encoder=spec["teacher_encoder"],
                             decoder_channels=spec["teacher_decoder_channels"])
               if kind in ("teacher", "distill") else None)
    return student, teacher


def run_worker(spec_path, output_path):
    """Measure one configuration in this process and write its result JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    import keras
    import tensorflow as tf

    if spec["threads"]:
        tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
    from mdekd.data import build_dataset
    from mdekd.distill import DepthTrainer, Distiller

    kind = spec["kind"]
    dataset = build_dataset(spec["data_dir"], "train", spec["dataset"], batch_size=spec["batch_size"],
                            image_size=(spec["height"], spec["width"]),
                            augment=spec["augment"] and kind == "pipeline", shuffle=True, seed=0, repeat=True)
    batches = iter(dataset)
    if kind == "pipeline":
        step = lambda: next(batches)  # noqa: E731
    else:
        images, depths = next(batches)
        student, teacher = _networks(spec, kind)
        trainer = (Distiller(teacher=teacher, student=student) if kind == "distill"
                   else DepthTrainer(student if kind == "student" else teacher))
        trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4))
        step = lambda: trainer.train_on_batch(images, depths)  # noqa: E731
    for _ in range(spec["warmup"]):
        step()
    seconds = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    stats = common.timing_stats(seconds)
    result = {"config": kind, "description": DESCRIPTIONS[kind], **stats,
              "images_per_s": spec["batch_size"] / (stats["median_ms"] / 1e3),
              "peak_rss_mb": peak_rss_mb()}
    common.write_atomically(output_path, json.dumps(result, indent=2))


def benchmark_throughput(config, output_dir, log=print):
    """Run every configuration in its own process; returns the payload of throughput.json."""
    machine = common.machine_info()
    results = []
    with tempfile.TemporaryDirectory(prefix="mdekd-throughput-") as temporary:
        data_dir = config["data_dir"]
        if data_dir is None:
            from mdekd.data.synthetic import generate_dataset

            count = max(2 * config["batch_size"], 4)
            log(f"generating {count} synthetic training scenes at {config['height']}x{config['width']}")
            data_dir = os.fspath(generate_dataset(
                os.path.join(temporary, "synthetic"), train=count, validation=0, height=config["height"],
                width=config["width"], seed=0, workers=1, progress=False))
            config = {**config, "dataset": "synthetic"}
        for kind in config["configs"]:
            spec = {**config, "kind": kind, "data_dir": data_dir}
            spec_path = os.path.join(temporary, f"{kind}.json")
            out_path = os.path.join(temporary, f"{kind}_result.json")
            common.write_atomically(spec_path, json.dumps(spec))
            log(f"measuring {kind} (load average {os.getloadavg()[0]:.2f})")
            common.run_child("benchmark.throughput", ["--worker", spec_path, "--worker_output", out_path])
            with open(out_path) as f:
                results.append(json.load(f))
    rows = [[r["config"], r["description"], common.fmt(r["images_per_s"], 2), common.fmt(r["median_ms"], 0),
             common.fmt(r["p90_ms"], 0), r["runs"], common.fmt(r["peak_rss_mb"], 0)] for r in results]
    table = common.markdown_table(
        ["config", "what", "images/s", "median step ms", "p90 step ms", "steps", "peak RSS MB"], rows)
    notes = [f"Batch {config['batch_size']} at {config['height']}×{config['width']}, random weights, "
             f"student {common.student_tag(config)}, teacher {config['teacher_encoder']} "
             f"(decoder {config['teacher_decoder_channels']}); data {config['data_dir'] or 'synthetic scenes'}; "
             f"each configuration in its own process.",
             f"Machine: {machine['cpu']}, {machine['cpu_count']} cores; load average before "
             f"{machine['load_average']}, after {[round(x, 2) for x in os.getloadavg()]}."]
    payload = {"config": config, "machine": machine, "results": results}
    common.write_results(output_dir, "throughput", table, payload, notes)
    return payload


def config_from_flags():
    config = {
        "configs": FLAGS.configs, "height": FLAGS.height, "width": FLAGS.width,
        "batch_size": FLAGS.batch_size, "steps": FLAGS.steps, "warmup": FLAGS.warmup,
        "data_dir": FLAGS.data_dir, "dataset": FLAGS.dataset, "augment": FLAGS.augment,
        **common.network_config(FLAGS), "threads": FLAGS.threads,
    }
    if FLAGS.smoke:
        config.update(height=64, width=64, batch_size=2, steps=2, warmup=1, student_alpha=0.25,
                      teacher_encoder="resnest14", teacher_decoder_channels=16)
    unknown = sorted(set(config["configs"]) - set(CONFIGS))
    if unknown:
        raise ValueError(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    return config


main = common.worker_benchmark_main(
    "benchmark.throughput", lambda: benchmark_throughput(config_from_flags(), FLAGS.output_dir),
    run_worker)


if __name__ == "__main__":
    define_flags()
    app.run(main)
