"""Ablation v2: does distillation make the FastDepth student better? Two protocols, one path.

    python -m benchmark.ablation                      # both protocols, synthetic scenes, 2 CPU cores
    python -m benchmark.ablation --protocols=label_scarce
    python -m benchmark.ablation --paper              # MAI2021 at 480x640, ResNeSt-101 teacher (GPU)
    python -m benchmark.ablation --smoke              # every arm of both protocols, tiny (CI)

Every network is trained by ``mdekd.training.run_training`` (the ``train.py`` path) and scored by
``mdekd.evaluate.evaluate_model`` on the validation split, on its **last** checkpoint (no model
selection on the split that is reported). Protocols (docs/ablation.md has the pre-registration):

- ``paper``: all training frames labelled; direct training vs the paper's KD (four stride pairs,
  ``pool_scale=0.5``, λd = 1), the same steps, seeds, initial weights and data order per seed.
- ``label_scarce``: the teacher learnt from every labelled frame; students see the labels of
  ``--labelled_frames`` of them and the rest as unlabelled photos (``--unlabeled_ratio`` of each
  batch). Arms: direct; paper-exact KD; the best pairwise node grid (``affinity_targets``, chosen
  by measurement before any student is trained); response KD; pairwise + response.

Each run writes its folder and a result JSON under ``--output_dir``; finished runs are reused, so
the command resumes where it stopped. Results: ``docs/results/<protocol>.json`` and a table.
"""

import dataclasses
import json
import math
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

from mdekd.atomic import prepare_directory, write_text_atomically
from mdekd.cli import command
from mdekd.distill import DISTILL_STRIDES

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "benchmark/results/ablation", "Run folders and per-run results.")
flags.DEFINE_string("results_dir", "docs/results", "Where the protocol JSON files are written.")
flags.DEFINE_list("protocols", ["label_scarce", "paper"], "Protocols to run, in order.")
flags.DEFINE_string("dataset", "synthetic", "synthetic | mai2021 (layout of --data_dir).")
flags.DEFINE_string("data_dir", "data/ablation", "Dataset root (synthetic: generated if absent).")
flags.DEFINE_integer("train_frames", 2000, "Synthetic training frames.")
flags.DEFINE_integer("validation_frames", 500, "Synthetic validation frames.")
flags.DEFINE_integer("height", 128, "Input height (multiple of 32).")
flags.DEFINE_integer("width", 160, "Input width (multiple of 32).")
flags.DEFINE_string("teacher_encoder", "resnest26", "ResNeSt variant of the teacher.")
flags.DEFINE_integer("teacher_decoder_channels", 64, "Teacher fusion-decoder width.")
flags.DEFINE_integer("teacher_steps", 600, "Teacher optimiser steps (all labelled frames).")
flags.DEFINE_float("student_alpha", 1.0, "Width multiplier of the student (1 = paper).")
flags.DEFINE_string("student_encoder", "mobilenet", "Student encoder (mobilenet = FastDepth, the paper's).")
flags.DEFINE_string("decoder_attention", "", "Student decoder attention: '' (none) or 'dual'.")
flags.DEFINE_list("arms", [], "Arms to run (default: all of each protocol), e.g. direct,response.")
flags.DEFINE_integer("paper_steps", 400, "Student steps of the paper protocol.")
flags.DEFINE_integer("scarce_steps", 800, "Student steps of the label-scarce protocol.")
flags.DEFINE_integer("labelled_frames", 150, "Labelled training frames of the label-scarce students.")
flags.DEFINE_float("unlabeled_ratio", 0.5, "Share of each label-scarce KD batch that is unlabelled.")
flags.DEFINE_integer("batch_size", 8, "Batch size of every run.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak AdamW learning rate (one-cycle).")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds of every arm.")
flags.DEFINE_integer("affinity_frames", 200, "Validation frames measured to choose the node grid.")
flags.DEFINE_bool("smoke", False, "Tiny sizes and a few steps: every arm end to end (CI).")
flags.DEFINE_bool("paper", False, "The paper's setting: MAI2021 at 480x640, ResNeSt-101 teacher.")

PAPER = dict(dataset="mai2021", data_dir="data/mai2021", height=480, width=640,
             teacher_encoder="resnest101", teacher_decoder_channels=256, teacher_steps=60000,
             paper_steps=40000, scarce_steps=40000, batch_size=16, learning_rate=3e-4,
             labelled_frames=1000)
SMOKE = dict(train_frames=12, validation_frames=4, height=64, width=64, student_alpha=0.25,
             teacher_encoder="resnest14", teacher_decoder_channels=16, teacher_steps=2,
             paper_steps=2, scarce_steps=2, batch_size=4, labelled_frames=6, seeds=["0"],
             affinity_frames=4, output_dir="benchmark/results/ablation_smoke",
             results_dir="benchmark/results/ablation_smoke/results", data_dir="data/ablation_smoke")
PAPER_KD = dict(lambda_d=1.0, pool_scale=0.5, feature_activation="", lambda_response=0.0)
# Node grids measured for the "best pairwise" arm; None (every cell a node) only where the map is
# small enough for an N×N affinity per image.
GRID_CANDIDATES = (0.5, 0.25, 0.125, None)
MAX_NODES = 1024
METRICS = ("si_rmse", "rmse", "abs_rel", "delta1")


def settings():
    """Flag values with --paper / --smoke presets applied (explicit flags still win)."""
    values = {flag.name: flag.value for flag in FLAGS.get_key_flags_for_module(sys.modules[__name__])}
    preset = PAPER if values["paper"] else SMOKE if values["smoke"] else {}
    for name, value in preset.items():
        if not FLAGS[name].present:
            values[name] = value
    values["seeds"] = [int(s) for s in values["seeds"]]
    unknown = sorted(set(values["protocols"]) - {"paper", "label_scarce"})
    if unknown:
        raise app.UsageError(f"--protocols: unknown {unknown}; expected paper, label_scarce")
    from mdekd.models.student import check_student_options

    try:
        check_student_options(values["student_encoder"], values["decoder_attention"],
                              names=("--student_encoder", "--decoder_attention"))
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    known_arms = {name for protocol in ("paper", "label_scarce") for name, _, _ in arms(protocol, {}, {}, "")}
    if set(values["arms"]) - known_arms:
        raise app.UsageError(f"--arms: unknown {sorted(set(values['arms']) - known_arms)}; "
                             f"expected some of {sorted(known_arms)}")
    return values


def log(message):
    print(f"[ablation {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cached(path, compute):
    """JSON result at ``path``, computed (and written atomically) only if absent."""
    path = pathlib.Path(path)
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    write_text_atomically(path, json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------------------------------- data

def prepare_data(s):
    """(labelled root, dataset name): the full scene set, generated once for ``synthetic``."""
    if s["dataset"] == "synthetic":
        from mdekd.data.synthetic import generate_dataset

        generate_dataset(s["data_dir"], train=s["train_frames"], validation=s["validation_frames"],
                         height=s["height"], width=s["width"], seed=1234, progress=False)
        return pathlib.Path(s["data_dir"]), "mai2021"  # the synthetic set is the MAI2021 layout
    return pathlib.Path(s["data_dir"]), s["dataset"]


def label_scarce_split(root, dataset, out, labelled):
    """Symlinked folders: ``out/labelled`` (the first ``labelled`` training pairs + the whole
    validation split, MAI2021 layout) and ``out/unlabelled`` (the other training RGB files)."""
    from mdekd.data import list_pairs

    pairs = list_pairs(root, "train", dataset)
    if labelled >= len(pairs):
        raise ValueError(f"--labelled_frames={labelled} leaves no unlabelled frame of {len(pairs)}")
    target, photos = out / "labelled", out / "unlabelled"
    if (photos / ".complete").exists():
        return target, photos

    def link(source, destination):
        destination.parent.mkdir(parents=True, exist_ok=True)
        if not destination.exists():
            destination.symlink_to(pathlib.Path(source).resolve())

    for index, (rgb, depth) in enumerate(pairs):
        name = f"{index:06d}"
        if index < labelled:
            link(rgb, target / "train" / "rgb" / f"{name}{pathlib.Path(rgb).suffix}")
            link(depth, target / "train" / "depth" / f"{name}.png")
        else:
            link(rgb, photos / f"{name}{pathlib.Path(rgb).suffix}")
    for index, (rgb, depth) in enumerate(list_pairs(root, "validation", dataset)):
        link(rgb, target / "validation" / "rgb" / f"{index:06d}{pathlib.Path(rgb).suffix}")
        link(depth, target / "validation" / "depth" / f"{index:06d}.png")
    (photos / ".complete").write_text("done\n")
    return target, photos


# ---------------------------------------------------------------------------------------- training

def base_config(s, **fields):
    from mdekd.train_config import TrainConfig

    return TrainConfig(height=s["height"], width=s["width"], batch_size=s["batch_size"],
                       learning_rate=s["learning_rate"], schedule="onecycle", augment=False,
                       student_alpha=s["student_alpha"], student_encoder=s["student_encoder"],
                       decoder_attention=s["decoder_attention"], teacher_encoder=s["teacher_encoder"],
                       teacher_decoder_channels=s["teacher_decoder_channels"], **fields)


def train_and_evaluate(config, steps, result_path):
    """Train ``config`` for ``steps`` (4 checkpointed epochs) and score its last checkpoint."""
    from mdekd.evaluate import evaluate_model
    from mdekd.training import run_training

    def compute():
        epochs = 4 if steps >= 4 else 1
        run_config = dataclasses.replace(config, epochs=epochs, steps_per_epoch=steps // epochs,
                                         validation_steps=8)
        start = time.perf_counter()
        result = run_training(run_config, progress=False)
        seconds = time.perf_counter() - start
        scores = evaluate_model(result["last"], config.data_dir, "mai2021", median_scaling=True)
        return {"metrics": scores["metrics"], "median_scaled_metrics": scores["median_scaled_metrics"],
                "train_seconds": seconds, "model": result["last"]}

    return cached(result_path, compute)


def train_teacher(s, root, dataset, out):
    config = base_config(s, mode="teacher", dataset=dataset, data_dir=str(root), seed=100,
                         output_dir=str(out / "teacher"))
    result = train_and_evaluate(config, s["teacher_steps"], out / "teacher.json")
    log(f"teacher si-RMSE {result['metrics']['si_rmse']:.4f}")
    return result


# --------------------------------------------------------------------------------- node-grid study

def affinity_targets(s, teacher_path, root, dataset, out):
    """Measure, per stride and candidate node grid, how much the teacher's affinities vary across
    images: the loss left by predicting the dataset-mean affinity (0 = the target carries no
    per-image information). The grid with the largest such loss per stride is the "best" one."""
    def compute():
        import keras
        import tensorflow as tf

        from mdekd import losses
        from mdekd.data import build_dataset

        teacher = keras.models.load_model(teacher_path, compile=False)
        ds = build_dataset(root, "validation", dataset, batch_size=4,
                           image_size=(s["height"], s["width"]), shuffle=False)
        outputs = {name: [] for name in DISTILL_STRIDES}
        seen = 0
        for images, _ in ds:
            result = teacher(images, training=False)
            for name in DISTILL_STRIDES:
                outputs[name].append(tf.nn.relu(result[name]).numpy())
            seen += len(images)
            if seen >= s["affinity_frames"]:
                break
        table = {}
        for name in DISTILL_STRIDES:
            maps = np.concatenate(outputs[name])
            rows = {}
            for grid in GRID_CANDIDATES:
                pool = losses.affinity_pool_size(*maps.shape[1:3], grid)
                nodes = losses.affinity_nodes(tf.constant(maps), pool)
                if nodes.shape[1] > MAX_NODES:
                    continue
                affinity = tf.linalg.matmul(nodes, nodes, transpose_b=True).numpy()
                mean = affinity.mean(axis=0, keepdims=True)
                rows[str(grid)] = {"nodes": int(nodes.shape[1]),
                                   "mean_predictor_loss": float(((affinity - mean) ** 2).mean()),
                                   "mean_off_diagonal": float(
                                       (affinity.sum((1, 2)) - np.trace(affinity, axis1=1, axis2=2)).mean()
                                       / max(nodes.shape[1] * (nodes.shape[1] - 1), 1))}
            best = max(rows, key=lambda key: rows[key]["mean_predictor_loss"])
            table[name] = {"candidates": rows, "best": best}
        return table

    table = cached(out / "affinity_targets.json", compute)
    grid = {name: (None if table[name]["best"] == "None" else float(table[name]["best"]))
            for name in DISTILL_STRIDES}
    log(f"best node grid per stride: {grid}")
    return table, grid


# ------------------------------------------------------------------------------------------- arms

def student_label(s):
    """'' for the paper's FastDepth student, else the student's name (run tags, result files)."""
    from mdekd.models.student import student_name

    name = student_name(s["student_encoder"], s["decoder_attention"] or None)
    return "" if name == "fastdepth" else name


def arms(protocol, grid, s, photos):
    """(name, paper_exact, config fields) of each arm of ``protocol``."""
    unlabelled = dict(unlabeled_dir=str(photos), unlabeled_ratio=s.get("unlabeled_ratio", 0.0))
    best_pairwise = dict(lambda_d=1.0, pool_scale=grid, feature_activation="relu")
    if protocol == "paper":
        return [("direct", False, dict(mode="student")),
                ("paper_kd", True, dict(mode="distill", **PAPER_KD))]
    return [("direct", False, dict(mode="student")),
            ("paper_kd", True, dict(mode="distill", **PAPER_KD)),
            ("pairwise_best", False, dict(mode="distill", lambda_response=0.0, **best_pairwise, **unlabelled)),
            ("response", False, dict(mode="distill", lambda_d=0.0, lambda_response=1.0, **unlabelled)),
            ("pairwise_response", False, dict(mode="distill", lambda_response=1.0, **best_pairwise,
                                              **unlabelled))]


def run_protocol(protocol, s, teacher, grid, root, photos, out, command, start):
    steps = s["paper_steps"] if protocol == "paper" else s["scarce_steps"]
    data_dir = root if protocol == "paper" else out / "label_scarce_data" / "labelled"
    table = [arm for arm in arms(protocol, grid, s, photos) if not s["arms"] or arm[0] in s["arms"]]
    student = student_label(s)
    results = {name: [] for name, _, _ in table}
    for seed in s["seeds"]:  # seed-major: a partial run has every arm on its first seeds
        for name, _, fields in table:
            tag = "_".join(filter(None, (protocol, student, name, f"seed{seed}")))
            config = base_config(s, dataset="mai2021", data_dir=str(data_dir), seed=seed,
                                 teacher=teacher["model"], teacher_cache=True,
                                 output_dir=str(out / tag), **fields)
            log(f"{tag}")
            results[name].append(train_and_evaluate(config, steps, out / f"{tag}.json"))
    report = {
        "protocol": protocol, "command": command,
        "wall_minutes": (time.perf_counter() - start) / 60,
        "machine": "2 vCPU, no GPU (the project's development machine)",
        "student": student or "fastdepth", "steps": steps, "teacher": {"si_rmse": teacher["metrics"]["si_rmse"],
                                    "metrics": teacher["metrics"]},
        "settings": {k: v for k, v in s.items() if k not in ("smoke", "paper")},
        "arms": [arm_summary(name, exact, fields, s["seeds"], results[name], results.get("direct"))
                 for name, exact, fields in table],
    }
    path = pathlib.Path(s["results_dir"]) / f"{'_'.join(filter(None, (protocol, student)))}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(report, indent=2, default=str))
    table_text = format_table(report)
    write_text_atomically(path.with_suffix(".md"), table_text)
    print(table_text)
    return report


def arm_summary(name, paper_exact, fields, seeds, runs, direct):
    summary = {"name": name, "paper_exact": paper_exact, "seeds": list(seeds),
               "config": {k: v for k, v in fields.items() if k != "unlabeled_dir"},
               "per_seed_si_rmse": [r["metrics"]["si_rmse"] for r in runs]}
    for metric in METRICS[1:]:
        summary[f"per_seed_{metric}"] = [r["metrics"][metric] for r in runs]
        summary[f"per_seed_{metric}_median_scaled"] = [r["median_scaled_metrics"][metric] for r in runs]
    if name != "direct":
        if direct:
            summary.update(paired_comparison(summary["per_seed_si_rmse"],
                                             [r["metrics"]["si_rmse"] for r in direct]))
    return summary


def paired_comparison(arm, direct):
    """Paired Δ si-RMSE vs direct (same seeds): mean, relative mean, paired t-test two-sided p."""
    from scipy import stats

    delta = np.asarray(arm) - np.asarray(direct)
    result = {"delta_si_rmse": float(delta.mean()),
              "relative_delta": float(delta.mean() / np.mean(direct)),
              "delta_std": float(delta.std(ddof=1)) if len(delta) > 1 else 0.0}
    if len(delta) > 1 and np.any(delta != delta[0]):
        result["p_value"] = float(stats.ttest_rel(arm, direct).pvalue)
    else:
        result["p_value"] = math.nan
    return result


def format_table(report):
    lines = [f"protocol `{report['protocol']}`, student {report.get('student', 'fastdepth')}: "
             f"{report['steps']} student steps; teacher si-RMSE "
             f"{report['teacher']['si_rmse']:.4f}\n",
             "| arm | paper-exact | seeds | si-RMSE | RMSE (m) | rel | δ1 | Δ si-RMSE vs direct | rel. Δ | p |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in report["arms"]:
        cells = []
        for metric in METRICS:
            values = arm[f"per_seed_{metric}"]
            cells.append(f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}")
        delta = (f"{arm['delta_si_rmse']:+.4f} ± {arm['delta_std']:.4f} | {100 * arm['relative_delta']:+.1f} % | "
                 f"{arm['p_value']:.3g}" if "delta_si_rmse" in arm else " | | ")
        lines.append(f"| {arm['name']} | {'yes' if arm['paper_exact'] else ''} | {len(arm['seeds'])} | "
                     + " | ".join(cells) + f" | {delta} |")
    return "\n".join(lines) + "\n"


def run(s, command):
    start = time.perf_counter()
    out = prepare_directory(pathlib.Path(s["output_dir"]).resolve(), "--output_dir")  # runs record absolute model paths
    root, dataset = prepare_data(s)
    teacher = train_teacher(s, root, dataset, out)
    _, grid = affinity_targets(s, teacher["model"], root, dataset, out)
    _, photos = label_scarce_split(root, dataset, out / "label_scarce_data", s["labelled_frames"])
    return [run_protocol(protocol, s, teacher, grid, root, photos, out, command, start)
            for protocol in s["protocols"]]


@command("benchmark.ablation")
def main(argv):
    run(settings(), "python -m benchmark.ablation " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    app.run(main)
