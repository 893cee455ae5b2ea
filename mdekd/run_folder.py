"""The run folder: what a training run writes, and how other tools find and read it.

A run folder (``--output_dir``) holds ``best.keras`` / ``last.keras`` (the trained network,
float32), ``run.json`` (the ``TrainConfig`` fields plus ``input_shape``, ``data_dir``,
``started``), ``flags.txt`` (the flags, flagfile format), ``best.json`` (the selection metric of
``best.keras``), ``metrics.csv``, ``tensorboard/`` and ``backup/`` (weights, optimiser and
``training_metadata.json`` with the completed epoch, for resuming). ``export.py``,
``benchmark.accuracy`` and the ablation read runs through this module only.
"""

import dataclasses
import json
import os
import pathlib
import time

from mdekd.atomic import prepare_directory, write_text_atomically

RUN_FILE = "run.json"
FLAGS_FILE = "flags.txt"
BEST_MODEL = "best.keras"
LAST_MODEL = "last.keras"
BACKUP_DIR = "backup"
STUDENT_MODES = ("student", "distill")  # run.json "mode" of runs whose network is a student


def prepare_output_dir(path, flag="--output_dir"):
    """Create the run folder ``path`` and prove it is writable (``mdekd.atomic.prepare_directory``)."""
    return prepare_directory(path, flag)


def write_run_files(output_dir, config, data_dir, flags_text=None):
    """``run.json`` from a ``TrainConfig`` (and ``flags.txt`` when ``flags_text`` is given)."""
    record = dataclasses.asdict(config)
    record.update(input_shape=list(config.input_shape), data_dir=str(data_dir),
                  started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_text_atomically(pathlib.Path(output_dir) / RUN_FILE, json.dumps(record, indent=2, default=str))
    if flags_text is not None:
        write_text_atomically(pathlib.Path(output_dir) / FLAGS_FILE, flags_text)


def read_run_config(model_path):
    """The ``run.json`` of the run folder holding ``model_path`` (a file or the folder), {} if none."""
    model_path = os.path.abspath(os.fspath(model_path))
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable {RUN_FILE} ({error})") from error


def network_kind(run):
    """"teacher" or "student": the network a run (its ``run.json`` dict) trained; "student" if unknown."""
    return "teacher" if run.get("mode") == "teacher" else "student"


def find_latest_run(runs_dir="runs", modes=STUDENT_MODES, model=BEST_MODEL):
    """Newest ``<runs_dir>/*/<model>`` whose run.json mode is one of ``modes``."""
    runs_dir = os.fspath(runs_dir)
    candidates = []
    if os.path.isdir(runs_dir):
        for name in os.listdir(runs_dir):
            path = os.path.join(runs_dir, name, model)
            if not os.path.isfile(path):
                continue
            try:
                mode = read_run_config(path).get("mode")
            except ValueError:
                continue
            if mode in modes:
                candidates.append((os.path.getmtime(path), path))
    if not candidates:
        raise FileNotFoundError(f"no trained network found: no {runs_dir}/*/{model} with a {RUN_FILE} "
                                f"whose mode is {' or '.join(modes)}; pass --model")
    return max(candidates)[1]


def resumed_epoch(output_dir):
    """Epochs completed by an interrupted run in ``output_dir`` (0 for a new run), from the
    ``keras.callbacks.BackupAndRestore`` metadata in ``backup/``."""
    metadata = pathlib.Path(output_dir) / BACKUP_DIR / "training_metadata.json"
    if metadata.exists():
        return int(json.loads(metadata.read_text()).get("epoch", 0))
    return 0
