"""The run folder (mdekd.run_folder): run.json written by training is what export and the
benchmarks read back; the newest run of the asked-for kind is found; exports are named by kind."""

import json
import os

import pytest

from mdekd import export, run_folder
from mdekd.train_config import TrainConfig


def _fake_run(runs, name, mode, age_s):
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "best.keras").write_bytes(b"")
    (folder / "run.json").write_text(json.dumps({"mode": mode, "input_shape": [64, 64, 3]}))
    stamp = 1_700_000_000 - age_s
    os.utime(folder / "best.keras", (stamp, stamp))
    return str(folder / "best.keras")


def test_run_files_round_trip_the_config(tmp_path):
    config = TrainConfig(mode="distill", height=64, width=96, lambda_d=3.0)
    run_folder.write_run_files(tmp_path, config, "data/x", flags_text="--mode=distill\n")
    run = run_folder.read_run_config(tmp_path / "best.keras")
    assert run["mode"] == "distill" and run["lambda_d"] == 3.0
    assert run["input_shape"] == [64, 96, 3] and run["data_dir"] == "data/x"
    assert run_folder.read_run_config(tmp_path) == run  # the folder itself works too
    assert (tmp_path / "flags.txt").read_text() == "--mode=distill\n"


def test_a_model_without_run_json_has_an_empty_config(tmp_path):
    assert run_folder.read_run_config(tmp_path / "model.keras") == {}


def test_an_unreadable_run_json_is_named(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="run.json"):
        run_folder.read_run_config(tmp_path / "best.keras")


def test_latest_student_run_is_found_and_teacher_runs_are_skipped(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "old_student", "student", age_s=300)
    newest_student = _fake_run(runs, "distilled", "distill", age_s=100)
    newest_teacher = _fake_run(runs, "teacher", "teacher", age_s=10)
    assert run_folder.find_latest_run(runs) == newest_student
    assert run_folder.find_latest_run(runs, modes=("teacher",)) == newest_teacher


def test_no_student_run_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model"):
        run_folder.find_latest_run(tmp_path / "runs")


def test_exports_are_named_after_the_network_the_run_trained(tmp_path):
    teacher = _fake_run(tmp_path, "teacher", "teacher", age_s=0)
    student = _fake_run(tmp_path, "distill", "distill", age_s=0)
    assert os.path.basename(export.default_output_path(teacher, "int8")) == "teacher_int8.tflite"
    assert os.path.basename(export.default_output_path(student, "none")) == "student_fp32.tflite"


def test_resumed_epoch_reads_the_backup_metadata(tmp_path):
    assert run_folder.resumed_epoch(tmp_path) == 0
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "training_metadata.json").write_text('{"epoch": 3, "batch": 0}')
    assert run_folder.resumed_epoch(tmp_path) == 3
