"""Shared pieces of the benchmarks: result tables and JSON, timing statistics, the sgemm peak,
machine and load information, and running a measurement in a child process.

Results go to ``<output_dir>/<name>.md`` (the markdown table, also printed) and
``<output_dir>/<name>.json`` (everything measured plus the machine), both written atomically.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from mdekd.atomic import write_text_atomically

DEFAULT_OUTPUT_DIR = os.path.join("benchmark", "results")
SGEMM_SIZE = 2048  # square float32 matmul: 8.6 GMACs, large enough to reach BLAS peak


def markdown_table(headers, rows):
    """Markdown table: ``headers`` (column names), ``rows`` (lists of cells; floats are kept as given)."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |")
    return "\n".join(lines)


def fmt(value, digits=2):
    """A number with ``digits`` decimals, or blank for None/NaN."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    return f"{value:.{digits}f}"


def write_atomically(path, text):
    """Write ``text`` to ``path`` atomically, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomically(path, text)


def write_results(output_dir, name, table, payload, notes=()):
    """Print ``table`` (+ notes) and write ``<output_dir>/<name>.md`` and ``.json``; returns the paths."""
    text = table + ("\n\n" + "\n".join(notes) if notes else "") + "\n"
    print(text)
    md_path = os.path.join(output_dir, f"{name}.md")
    json_path = os.path.join(output_dir, f"{name}.json")
    write_atomically(md_path, text)
    write_atomically(json_path, json.dumps(payload, indent=2, default=_json_default) + "\n")
    print(f"wrote {md_path} and {json_path}")
    return md_path, json_path


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def timing_stats(seconds):
    """Median, p90, min and mean (milliseconds) of a list of durations in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        "runs": int(ms.size),
    }


def time_interleaved(runners, image, runs):
    """Seconds of ``runs`` calls of ``runner.run_one(image)`` for each of ``runners`` (a dict of
    ``TFLiteRunner``), after one untimed call each (XNNPACK plans on the first); the runners take
    turns, so load changes on a shared machine hit all of them alike. Returns {key: [seconds]}."""
    timings = {key: [] for key in runners}
    for runner in runners.values():
        runner.run_one(image)
    for _ in range(runs):
        for key, runner in runners.items():
            start = time.perf_counter()
            runner.run_one(image)
            timings[key].append(time.perf_counter() - start)
    return timings


def machine_info():
    """CPU model, core count, load averages and library versions, stored with every result."""
    import importlib.metadata

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for package in ("tensorflow", "keras", "ai-edge-litert", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": versions,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def thread_env(threads):
    """Environment pinning BLAS/OpenMP pools to ``threads`` (read by numpy's OpenBLAS at import)."""
    env = dict(os.environ)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def sgemm_gmacs(size=SGEMM_SIZE, repeats=10):
    """Achieved float32 matmul rate of *this* process's numpy BLAS, GMAC/s (best of ``repeats``).

    The best run, not the median: the peak is what the hardware can do when it is not
    disturbed, which on a shared machine only the fastest runs show.

    ``size``³ multiply-adds per product. The thread count is whatever OpenBLAS was started with:
    call it in a process whose ``OPENBLAS_NUM_THREADS`` was set before numpy was imported
    (``thread_env``), as the benchmarks' child processes are.
    """
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    a @ b  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return size**3 / best / 1e9


def run_child(module, args, threads=None, timeout=None):
    """Run ``python -m <module> <args>`` (thread env if given); raise with its stderr on failure."""
    env = thread_env(threads) if threads else {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    return result


def parse_int_list(text, flag):
    """'1,2' -> [1, 2], naming the flag on error."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise ValueError(f"--{flag}: expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise ValueError(f"--{flag}: expected positive integers, got {text!r}")
    return values


def quiet_tensorflow():
    """Lower TF/absl logging to warnings (the converter logs every step at INFO)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def worker_benchmark_main(program, run_benchmark, run_worker):
    """``main(argv)`` of a benchmark whose measurements run in worker subprocesses: with
    ``--worker SPEC --worker_output OUT`` it is that worker (``run_worker(SPEC, OUT)``), otherwise it
    checks ``--output_dir`` and calls ``run_benchmark()``; errors as every CLI (``mdekd.cli``)."""
    from absl import flags

    from mdekd.atomic import prepare_directory
    from mdekd.cli import command

    @command(program, errors=(RuntimeError,))
    def main(argv):
        FLAGS = flags.FLAGS
        quiet_tensorflow()
        if FLAGS.worker:
            return run_worker(FLAGS.worker, FLAGS.worker_output)
        prepare_directory(FLAGS.output_dir, "--output_dir")
        run_benchmark()

    return main


NETWORK_FLAGS = ("student_encoder", "decoder_attention", "student_alpha", "teacher_encoder",
                 "teacher_decoder_channels")


def define_network_flags():
    """The flags that choose the student and teacher a benchmark builds (random weights)."""
    from absl import flags

    flags.DEFINE_string("student_encoder", "mobilenet", "Student encoder, a key of mdekd.models.STUDENT_ENCODERS.")
    flags.DEFINE_string("decoder_attention", "", "Student decoder attention: '' (none) or 'dual'.")
    flags.DEFINE_float("student_alpha", 1.0, "Width multiplier of the student.")
    flags.DEFINE_string("teacher_encoder", "resnest101", "ResNeSt variant of the teacher.")
    flags.DEFINE_integer("teacher_decoder_channels", 256, "Teacher decoder width.")


def network_config(flag_values):
    """The network flags' values as a config dict; an unregistered student is refused here."""
    from mdekd.models.student import check_student_options

    config = {name: flag_values[name].value for name in NETWORK_FLAGS}
    check_student_options(config["student_encoder"], config["decoder_attention"],
                          names=("--student_encoder", "--decoder_attention"))
    return config


def student_options(config):
    """``build_student`` keyword arguments of a benchmark config."""
    return dict(encoder=config.get("student_encoder", "mobilenet"),
                decoder_attention=config.get("decoder_attention") or None, alpha=config["student_alpha"])


def student_tag(config):
    """A file-name tag of the student a config builds, e.g. ``mobilevit_xs_dual_alpha1.0``."""
    parts = (config.get("student_encoder", "mobilenet"), config.get("decoder_attention") or "",
             f"alpha{config['student_alpha']}")
    return "_".join(p for p in parts if p)


def define_worker_flags():
    """The internal flags of ``worker_benchmark_main``'s worker subprocess."""
    from absl import flags

    flags.DEFINE_string("worker", None, "(internal) measure the spec JSON of this path in this process.")
    flags.DEFINE_string("worker_output", None, "(internal) where the worker writes its result.")
