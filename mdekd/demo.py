"""The built-in demo (``make demo``): synthetic scenes → teacher → distilled student → TFLite → latency.

Each step is the command a user would type, run in turn and echoed, so the demo doubles as a
walk-through of the command-line tools. Finished steps are reused when the demo is run again.

    python -m mdekd.demo
"""

import pathlib
import shlex
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = "data/quickstart"
TEACHER = "runs/quickstart_teacher"
STUDENT = "runs/quickstart_distill"
PANEL_SCENE = "000000"  # the validation scene drawn at the end
PANEL = f"runs/quickstart_predict/{PANEL_SCENE}_panel.png"


def steps():
    """(title, argv, product) for each step; a step whose product exists is skipped."""
    py = sys.executable
    return [
        ("synthesise 256 + 64 scenes at 128x160 and print their statistics",
         [py, "-m", "mdekd.data.synthetic", "--output", DATA, "--train", "256", "--validation",
          "64", "--height", "128", "--width", "160", "--seed", "0"], None),
        ("train the teacher (ResNeSt-14 + fusion decoder)",
         [py, "train.py", "--flagfile=configs/quickstart_teacher.cfg"], f"{TEACHER}/last.keras"),
        ("distil the FastDepth student from the teacher",
         [py, "train.py", "--flagfile=configs/quickstart_distill.cfg"], f"{STUDENT}/last.keras"),
        ("export the student to fp16 TFLite (verified against Keras)",
         [py, "export.py", f"--model={STUDENT}/best.keras", "--quantize=fp16",
          f"--output={STUDENT}/student_fp16.tflite"], f"{STUDENT}/student_fp16.tflite"),
        ("export the student to full-int8 TFLite (calibrated on training images)",
         [py, "export.py", f"--model={STUDENT}/best.keras", "--quantize=int8",
          f"--representative_data={DATA}", f"--output={STUDENT}/student_int8.tflite"],
         f"{STUDENT}/student_int8.tflite"),
        ("evaluate the int8 model on the validation scenes (metres as predicted, and median-scaled)",
         [py, "-m", "mdekd.evaluate", f"--model={STUDENT}/student_int8.tflite",
          f"--data_dir={DATA}", "--median_scaling"], None),
        ("latency of the student at 128x160 (Keras and TFLite, 1 and 2 threads)",
         [py, "-m", "benchmark.latency", "--models=student", "--height=128", "--width=160",
          "--runs=30", "--output_dir=runs/quickstart_latency"], None),
        ("draw RGB | truth | prediction | error of a validation scene (int8 model, metres)",
         [py, "-m", "mdekd.predict", f"--model={STUDENT}/student_int8.tflite",
          f"--input={DATA}/validation/rgb/{PANEL_SCENE}.png",
          f"--depth_dir={DATA}/validation/depth", "--output=runs/quickstart_predict"], None),
    ]


def main():
    start = time.perf_counter()
    for index, (title, command, product) in enumerate(steps(), 1):
        print(f"\n=== [{index}/{len(steps())}] {title}\n$ python {shlex.join(command[1:])}",
              flush=True)
        if product and (REPO_ROOT / product).exists():
            print(f"(already done: {product} exists)", flush=True)
            continue
        result = subprocess.run(command, cwd=REPO_ROOT)
        if result.returncode != 0:
            print(f"demo: step {index} failed (exit code {result.returncode})", file=sys.stderr)
            return result.returncode
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min; "
          f"models in {TEACHER}/ and {STUDENT}/\npicture: {REPO_ROOT / PANEL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
