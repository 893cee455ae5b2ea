"""Every command that writes refuses an output it cannot make with one line naming the flag and
the path (here: a path below an existing *file*), before any long work and without a traceback."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "blocker").write_text("a file where a folder is needed")
    (folder / "photos").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "photos" / "a.png")
    (folder / "model.keras").write_bytes(b"")  # never opened: the output is checked first
    (folder / "timm.safetensors").write_bytes(b"")
    return folder


COMMANDS = {
    "train": (["train.py", "--mode=student", "--output_dir={b}/run", "--data_dir={i}/data"], "--output_dir"),
    "export": (["export.py", "--model={i}/model.keras", "--output={b}/m.tflite"], "--output"),
    "evaluate": (["-m", "mdekd.evaluate", "--model={i}/model.keras", "--data_dir={i}",
                  "--json={b}/r.json"], "--json"),
    "predict": (["-m", "mdekd.predict", "--model={i}/model.keras", "--input={i}/photos",
                 "--output={b}/out"], "--output"),
    "pseudo_label": (["-m", "mdekd.pseudo_label", "--teacher={i}/model.keras", "--input={i}/photos",
                      "--output={b}/labels"], "--output"),
    "synthetic": (["-m", "mdekd.data.synthetic", "--output={b}/data", "--train=1", "--validation=0"],
                  "--output"),
    "convert_resnest": (["-m", "mdekd.models.convert_resnest", "--input={i}/timm.safetensors",
                         "--output={b}/w.weights.h5"], "--output"),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_an_output_below_a_file_is_refused_in_one_line(inputs, name):
    arguments, flag = COMMANDS[name]
    arguments = [a.format(i=inputs, b=inputs / "blocker") for a in arguments]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, *arguments], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if f"{flag}" in line and "blocker" in line]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "cannot write" in errors[0] and "blocker' is a file" in errors[0]
    assert not any((inputs / "blocker").parent.glob("blocker*/"))  # nothing was created
