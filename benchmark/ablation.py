"""The paper's ablation: the FastDepth student trained directly vs by distillation, over seeds.

    python -m benchmark.ablation                 # default: synthetic scenes, sized for 2 CPU cores
    python -m benchmark.ablation --paper         # MAI2021 at 480x640 with ResNeSt-101 (GPU)
    python -m benchmark.ablation --smoke         # tiny end-to-end check (CI)

Steps, each reused when its result file exists (the run is resumable):
1. synthesise (or reuse) the scene set; load train and validation splits into memory;
2. train the teacher (the larger share of the budget) and evaluate it;
3. for every seed, train the student directly, and check the teacher's margin over it;
4. for every seed, distil the student from the teacher with the same steps, schedule, data order,
   initial weights and seed; the teacher's targets are precomputed once (``--teacher_cache``);
5. export the seed-0 distilled student to fp16 and int8 TFLite and evaluate those;
6. optionally, a study of distillation knobs (``--study``);
then print and save the table (markdown + JSON) in the paper's form.
"""

import json
import os
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "benchmark/results/ablation", "Results and trained models.")
flags.DEFINE_string("dataset", "synthetic", "synthetic | mai2021 | folder | kitti | nyu.")
flags.DEFINE_string("data_dir", "data/ablation", "Dataset root (synthetic: generated if absent).")
flags.DEFINE_integer("train_frames", 2000, "Synthetic training frames.")
flags.DEFINE_integer("validation_frames", 500, "Synthetic validation frames.")
flags.DEFINE_integer("height", 128, "Input height (multiple of 32).")
flags.DEFINE_integer("width", 160, "Input width (multiple of 32).")
flags.DEFINE_string("teacher_encoder", "resnest26", "ResNeSt variant of the teacher.")
flags.DEFINE_integer("teacher_decoder_channels", 128, "Teacher fusion-decoder width.")
flags.DEFINE_float("student_alpha", 1.0, "MobileNet width multiplier of the student (1 = paper).")
flags.DEFINE_integer("teacher_steps", 1500, "Teacher optimiser steps.")
flags.DEFINE_integer("student_steps", 400, "Optimiser steps of every student run (both arms).")
flags.DEFINE_integer("batch_size", 8, "Batch size of every run.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak AdamW learning rate (one-cycle).")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds per arm.")
flags.DEFINE_float("lambda_d", 1.0, "Weight of the distillation loss.")
flags.DEFINE_list("distill_strides", ["stride16", "stride8", "stride4", "stride2"], "Pairs.")
flags.DEFINE_float("pool_scale", 0.5, "Node grid of the pairwise loss (0 = no pooling).")
flags.DEFINE_bool("teacher_cache", True, "Precompute the teacher's targets once (no augmentation).")
flags.DEFINE_float("min_teacher_margin", 0.10,
                   "Stop unless the teacher's si-RMSE is this much lower than the direct student's.")
flags.DEFINE_list("study", [], "Extra distillation settings, each 'key=value[:key=value]' with keys "
                  "pool_scale, lambda_d, strides (strides joined by '+'); e.g. pool_scale=0.125.")
flags.DEFINE_integer("study_seeds", 2, "Seeds per study setting (the first N of --seeds).")
flags.DEFINE_bool("tflite", True, "Add fp16/int8 TFLite rows of the seed-0 distilled student.")
flags.DEFINE_bool("smoke", False, "Tiny sizes and a few steps: checks the pipeline end to end.")
flags.DEFINE_bool("paper", False, "The paper's setting: MAI2021 at 480x640, ResNeSt-101 teacher.")

PAPER = dict(dataset="mai2021", data_dir="data/mai2021", height=480, width=640,
             teacher_encoder="resnest101", teacher_decoder_channels=256, teacher_steps=60000,
             student_steps=40000, batch_size=16, learning_rate=3e-4)
SMOKE = dict(train_frames=8, validation_frames=4, height=64, width=64, student_alpha=0.25,
             teacher_encoder="resnest14",
             teacher_decoder_channels=16, teacher_steps=4, student_steps=2, batch_size=2,
             seeds=["0", "1"], study_seeds=1, min_teacher_margin=-1e9)
COLUMNS = ("si_rmse", "rmse", "abs_rel", "delta1")


def settings():
    """Flag values with --paper / --smoke presets applied (explicit flags still win)."""
    values = {flag.name: flag.value
              for flag in FLAGS.get_key_flags_for_module(sys.modules[__name__])}
    preset = PAPER if values["paper"] else SMOKE if values["smoke"] else {}
    for name, value in preset.items():
        if not FLAGS[name].present:
            values[name] = value
    values["seeds"] = [int(s) for s in values["seeds"]]
    if values["smoke"] and not FLAGS["output_dir"].present:
        values["output_dir"] = "benchmark/results/ablation_smoke"
    if values["smoke"] and not FLAGS["data_dir"].present:
        values["data_dir"] = "data/ablation_smoke"
    return values


def log(message):
    print(f"[ablation {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- data

def load_split(root, dataset, split, size):
    """(images uint8 (N, H, W, 3), depths float32 (N, H, W, 1) metres) resized to ``size``."""
    from mdekd.data import list_pairs, read_depth_png, read_rgb, resolve_layout
    from mdekd.predict import resize_image

    scale = resolve_layout(dataset).depth_scale
    images, depths = [], []
    for rgb, depth in list_pairs(root, split, dataset):
        images.append((resize_image(read_rgb(rgb), size) * 255).round().astype(np.uint8))
        truth = read_depth_png(depth, scale)
        if truth.shape[:2] != tuple(size):  # nearest: never blend invalid (0) with valid depth
            rows = np.arange(size[0]) * truth.shape[0] // size[0]
            cols = np.arange(size[1]) * truth.shape[1] // size[1]
            truth = truth[rows][:, cols]
        depths.append(truth.astype(np.float32))
    return np.stack(images), np.stack(depths)


def training_batches(images, depths, batch_size, seed, targets=None):
    """Endless shuffled batches; the order depends only on ``seed`` (same for both arms)."""
    import tensorflow as tf

    inputs = images if targets is None else {"image": images, **targets}
    ds = tf.data.Dataset.from_tensor_slices((inputs, depths))
    ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True).repeat()

    def to_float(x, y):
        if isinstance(x, dict):
            return {**x, "image": tf.cast(x["image"], tf.float32) / 255.0}, y
        return tf.cast(x, tf.float32) / 255.0, y

    return ds.batch(batch_size, drop_remainder=True).map(to_float).prefetch(2)


# ------------------------------------------------------------------------------------------ running

def train(trainer, batches, steps, learning_rate, label):
    import keras

    from mdekd.schedules import make_schedule

    trainer.compile(optimizer=keras.optimizers.AdamW(
        make_schedule("onecycle", learning_rate, steps), weight_decay=1e-4), jit_compile=False)
    start = time.perf_counter()
    trainer.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0,
                callbacks=[ProgressBar(steps, label)])
    return time.perf_counter() - start


class _Progress:
    def __init__(self, total, label):
        self.total, self.label, self.start = total, label, time.perf_counter()

    def update(self, done, loss):
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        width = 30
        bar = "#" * int(width * done / self.total)
        print(f"\r  {self.label} [{bar:<{width}}] {done}/{self.total} loss {loss:.4f} "
              f"{rate:.2f} steps/s", end="\n" if done == self.total else "", file=sys.stderr,
              flush=True)


def ProgressBar(total, label):  # noqa: N802  (a Keras callback factory)
    import keras

    class Bar(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.progress = _Progress(total, label)

        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % 10 == 0 or batch + 1 == total:
                self.progress.update(batch + 1, float((logs or {}).get("loss", float("nan"))))

    return Bar()


def evaluate(model, images, depths, batch_size=16):
    """SPEC §2 metrics on the validation arrays, raw and after per-image median scaling.

    Every training loss here (SI, gradient matching, pairwise) is scale-invariant, so nothing fixes
    the networks' absolute scale: RMSE, rel and δ1 are read after scaling each prediction by
    median(truth) / median(prediction) over the valid pixels (the usual protocol for such models);
    si-RMSE is unaffected by it.
    """
    from mdekd.evaluate import median_scaled
    from mdekd.metrics import DepthMetricsAccumulator
    from mdekd.tflite_runner import load_depth_runner

    runner = load_depth_runner(model)
    raw, scaled = DepthMetricsAccumulator(), DepthMetricsAccumulator()
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype(np.float32) / 255.0
        for truth, prediction in zip(depths[start:start + batch_size], runner.predict(batch)):
            raw.update(truth, prediction)
            scaled.update(truth, median_scaled(truth, prediction))
    return {"metrics": scaled.result(), "raw_metrics": raw.result()}


def cached(path, compute):
    """JSON result at ``path``, computed (and written atomically) only if absent."""
    path = pathlib.Path(path)
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    return result


def run(s):
    import keras

    from mdekd.distill import DepthTrainer, Distiller, compute_teacher_targets
    from mdekd.models import build_student, build_teacher
    from mdekd.training import save_model_atomically

    out = pathlib.Path(s["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    size = (s["height"], s["width"])
    dataset = s["dataset"]  # "synthetic" is the MAI2021 layout to every loader
    t0 = time.perf_counter()
    if s["dataset"] == "synthetic":
        from mdekd.data.synthetic import generate_dataset

        log(f"scene set {s['data_dir']}: {s['train_frames']} train + {s['validation_frames']} val")
        generate_dataset(s["data_dir"], train=s["train_frames"], validation=s["validation_frames"],
                         height=s["height"], width=s["width"], seed=1234, progress=True)
    images, depths = load_split(s["data_dir"], dataset, "train", size)
    val_images, val_depths = load_split(s["data_dir"], dataset, "validation", size)
    log(f"loaded {len(images)} training and {len(val_images)} validation frames at {size}")

    # Teacher: more steps, a larger network; trained once.
    teacher_path = out / "teacher.keras"

    def train_teacher():
        keras.utils.set_random_seed(100)
        teacher = build_teacher((*size, 3), encoder=s["teacher_encoder"],
                                decoder_channels=s["teacher_decoder_channels"])
        seconds = train(DepthTrainer(teacher), training_batches(
            images, depths, s["batch_size"], 100), s["teacher_steps"], s["learning_rate"], "teacher")
        save_model_atomically(teacher, teacher_path)
        return {**evaluate(teacher, val_images, val_depths), "train_seconds": seconds}

    teacher_result = cached(out / "teacher.json", train_teacher)
    teacher = keras.models.load_model(teacher_path, compile=False)
    log(f"teacher si-RMSE {teacher_result['metrics']['si_rmse']:.4f}")

    target_cache = {}

    def teacher_targets(trainer, strides, pool_scale):
        key = (strides, pool_scale)  # the targets depend on the setting, not on the seed
        if key not in target_cache:
            log(f"precomputing teacher targets for {len(images)} frames, {strides}, pool {pool_scale}")
            target_cache[key] = compute_teacher_targets(trainer, images.astype(np.float32) / 255.0)
        return target_cache[key]

    def student_run(arm, seed, lambda_d, strides, pool_scale, tag):
        # Names carry settings such as "0.125": build them whole, never with with_suffix().
        name = f"{tag}_seed{seed}"

        def compute():
            keras.utils.set_random_seed(seed)
            # Same seed → same initial weights in both arms.
            student = build_student((*size, 3), alpha=s["student_alpha"])
            if arm == "direct":
                trainer, targets = DepthTrainer(student), None
            else:
                trainer = Distiller(teacher=teacher, student=student, lambda_d=lambda_d,
                                    strides=strides, pool_scale=pool_scale)
                targets = (teacher_targets(trainer, strides, pool_scale)
                           if s["teacher_cache"] else None)
                if targets is not None:
                    trainer = Distiller(teacher=None, student=student, lambda_d=lambda_d,
                                        strides=strides, pool_scale=pool_scale)
            seconds = train(trainer, training_batches(
                images, depths, s["batch_size"], seed, targets), s["student_steps"],
                s["learning_rate"], f"{tag} seed {seed}")
            save_model_atomically(student, out / f"{name}.keras")
            return {**evaluate(student, val_images, val_depths), "train_seconds": seconds}

        return cached(out / f"{name}.json", compute)

    pool = s["pool_scale"] or None
    strides = tuple(s["distill_strides"])
    direct = [student_run("direct", seed, 0, (), None, "direct") for seed in s["seeds"]]
    direct_si = float(np.mean([r["metrics"]["si_rmse"] for r in direct]))
    margin = 1.0 - teacher_result["metrics"]["si_rmse"] / direct_si
    log(f"teacher margin over the direct student: {100 * margin:.1f} % lower si-RMSE")
    if margin < s["min_teacher_margin"]:
        raise SystemExit(
            f"ablation stopped: the teacher (si-RMSE {teacher_result['metrics']['si_rmse']:.4f}) is "
            f"only {100 * margin:.1f} % better than the directly trained student ({direct_si:.4f}); "
            f"distillation is judged only with a margin of at least "
            f"{100 * s['min_teacher_margin']:.0f} %. Give the teacher more steps (--teacher_steps), "
            f"a larger variant (--teacher_encoder) or more data (--train_frames).")
    kd = [student_run("distill", seed, s["lambda_d"], strides, pool, "distill")
          for seed in s["seeds"]]

    rows = {"teacher": summarise([teacher_result]), "student, direct training": summarise(direct),
            "student, distillation": summarise(kd, baseline=direct)}
    if s["tflite"]:
        rows.update(tflite_rows(out, s, val_images, val_depths))
    for setting in s["study"]:
        options = parse_setting(setting, s["lambda_d"], strides, pool)
        tag = "study_" + setting.replace("=", "-").replace(":", "_").replace("+", "-")
        results = [student_run("distill", seed, options["lambda_d"], options["strides"],
                               options["pool_scale"], tag) for seed in s["seeds"][:s["study_seeds"]]]
        rows[f"study: {setting}"] = summarise(results, baseline=direct)
    report = {"rows": rows, "teacher_margin": margin, "settings": s,
              "wall_seconds": time.perf_counter() - t0}
    write_report(out, report)
    return report


def parse_setting(setting, lambda_d, strides, pool_scale):
    options = {"lambda_d": lambda_d, "strides": strides, "pool_scale": pool_scale}
    for item in setting.split(":"):
        key, _, value = item.partition("=")
        if key == "pool_scale":
            options[key] = float(value) or None
        elif key == "lambda_d":
            options[key] = float(value)
        elif key == "strides":
            options[key] = tuple(value.split("+"))
        else:
            raise ValueError(f"--study: unknown key '{key}' in '{setting}'; "
                             "expected pool_scale, lambda_d or strides")
    return options


def tflite_rows(out, s, val_images, val_depths):
    from mdekd.export import export_tflite

    dataset = s["dataset"]
    model = out / f"distill_seed{s['seeds'][0]}.keras"
    rows = {}
    for mode in ("fp16", "int8"):
        tflite = out / f"distill_seed{s['seeds'][0]}_{mode}.tflite"

        def compute(mode=mode, tflite=tflite):
            export_tflite(str(model), mode, output=str(tflite), representative_data=s["data_dir"],
                          dataset=dataset, validation_data=s["data_dir"], progress=False,
                          log=lambda *a, **k: None)
            return evaluate(str(tflite), val_images, val_depths)

        result = cached(out / f"distill_seed{s['seeds'][0]}_{mode}.json", compute)
        rows[f"student, distillation, TFLite {mode} (seed {s['seeds'][0]})"] = summarise([result])
    return rows


def _stats(values):
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "n": len(values),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def summarise(results, baseline=None):
    """Mean and sample std over runs of each column; with ``baseline`` (the direct runs, in seed
    order) also the si-RMSE difference to the direct run of the same seed, paired by seed."""
    row = {column: _stats([r["metrics"][column] for r in results]) for column in COLUMNS}
    if baseline is not None:
        row["delta_si_rmse"] = _stats([r["metrics"]["si_rmse"] - b["metrics"]["si_rmse"]
                                       for r, b in zip(results, baseline)])
    return row


def format_table(rows):
    header = ("| model | si-RMSE | RMSE (m)* | rel* | δ1* | Δ si-RMSE vs direct, same seeds | runs |\n"
              "|---|---|---|---|---|---|---|\n")
    lines = []
    for name, row in rows.items():
        cells = []
        for column in COLUMNS:
            mean, std = row[column]["mean"], row[column]["std"]
            cells.append(f"{mean:.4f} ± {std:.4f}" if row[column]["n"] > 1 else f"{mean:.4f}")
        delta = row.get("delta_si_rmse")
        cells.append(f"{delta['mean']:+.4f} ± {delta['std']:.4f}" if delta else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row[COLUMNS[0]]['n']} |")
    return header + "\n".join(lines) + "\n"


def write_report(out, report):
    table = format_table(report["rows"])
    text = (f"{table}\n* after per-image median scaling (all losses are scale-invariant); "
            f"mean ± sample std over runs.\n\nteacher margin over the direct student: "
            f"{100 * report['teacher_margin']:.1f} % lower si-RMSE; wall time "
            f"{report['wall_seconds'] / 60:.1f} min (reused parts not counted)\n")
    for name, content in (("ablation.md", text),
                          ("ablation.json", json.dumps(report, indent=2, default=str))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(content)
        os.replace(tmp, out / name)
    print(text)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    s = settings()
    run(s)


if __name__ == "__main__":
    app.run(main)
