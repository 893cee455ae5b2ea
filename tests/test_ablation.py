"""benchmark.ablation in smoke mode: the whole experiment runs and its table has every row."""

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ablation_smoke_run_reports_every_row_and_resumes(tmp_path):
    command = [sys.executable, "-m", "benchmark.ablation", "--smoke", f"--output_dir={tmp_path / 'out'}",
               f"--data_dir={tmp_path / 'scenes'}", "--study=pool_scale=0.25", "--study_seeds=2"]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "ablation.json").read_text())
    rows = report["rows"]
    assert list(rows) == [
        "teacher", "student, direct training", "student, distillation",
        "student, distillation, TFLite fp16 (seed 0)", "student, distillation, TFLite int8 (seed 0)",
        "study: pool_scale=0.25"]
    assert rows["student, direct training"]["si_rmse"]["n"] == 2
    assert rows["study: pool_scale=0.25"]["si_rmse"]["n"] == 2
    # Each run keeps its own files, even when a setting's name holds a dot.
    assert {p.name for p in (tmp_path / "out").glob("study_*_seed*.json")} == {
        "study_pool_scale-0.25_seed0.json", "study_pool_scale-0.25_seed1.json"}
    for row in rows.values():
        assert 0 < row["si_rmse"]["mean"] < 10
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert table.count("\n| ") == len(rows)  # one line per row below the header

    # Everything is reused on a second run: no training step is repeated.
    second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "steps/s" not in second.stderr
    assert json.loads((tmp_path / "out" / "ablation.json").read_text())["rows"] == rows
