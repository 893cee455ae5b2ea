"""benchmark.ablation in smoke mode: chosen arms run, are reported, and are reused.

The smoke runs two arms of the label-scarce protocol: direct, and pairwise + response on unlabelled
photos (the teacher, both distillation terms, the unlabelled data path). The paper's KD is the
same pairwise loss on labelled frames, and the paper protocol the same loop with a shorter arm
table; each tiny run costs about a minute of tracing, so the suite does not run all eight."""

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ARMS = {"label_scarce": ["direct", "pairwise_response"]}


def test_ablation_smoke_runs_the_chosen_arms_and_resumes(tmp_path):
    results = tmp_path / "results"
    command = [sys.executable, "-m", "benchmark.ablation", "--smoke", f"--output_dir={tmp_path / 'out'}",
               f"--data_dir={tmp_path / 'scenes'}", f"--results_dir={results}", "--protocols=label_scarce",
               f"--arms={','.join(ARMS['label_scarce'])}"]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    for protocol, arms in ARMS.items():
        report = json.loads((results / f"{protocol}.json").read_text())
        assert report["protocol"] == protocol and report["wall_minutes"] > 0
        assert report["command"].startswith("python -m benchmark.ablation")
        assert [arm["name"] for arm in report["arms"]] == arms
        assert not any(arm["paper_exact"] for arm in report["arms"])
        for arm in report["arms"]:
            assert arm["seeds"] == [0] and len(arm["per_seed_si_rmse"]) == 1
            assert 0 < arm["per_seed_si_rmse"][0] < 10
            if arm["name"] != "direct":
                assert "delta_si_rmse" in arm
        table = (results / f"{protocol}.md").read_text()
        assert table.count("\n| ") == len(arms) + 1  # header + one line per arm
    grid = json.loads((tmp_path / "out" / "affinity_targets.json").read_text())
    assert set(grid) == {"stride16", "stride8", "stride4", "stride2"}

    # Everything is reused on a second run: no network is trained again.
    before = (results / "label_scarce.json").read_text()
    second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Epoch" not in second.stdout
    assert json.loads((results / "label_scarce.json").read_text())["arms"] == json.loads(before)["arms"]


def test_only_the_papers_kd_arm_is_marked_paper_exact_in_both_protocols():
    from benchmark.ablation import PAPER_KD, arms

    for protocol in ("paper", "label_scarce"):
        table = arms(protocol, grid=0.125, s={}, photos="photos")
        assert [name for name, paper_exact, _ in table if paper_exact] == ["paper_kd"]
        assert dict((name, fields) for name, _, fields in table)["paper_kd"] == dict(mode="distill", **PAPER_KD)


def test_ablation_refuses_an_unregistered_student_in_one_line():
    command = [sys.executable, "-m", "benchmark.ablation", "--student_encoder=resnet18"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--student_encoder: unknown student encoder 'resnet18'; registered: mobilenet, mobilevit_xxs" in result.stderr
    assert "Traceback" not in result.stderr
