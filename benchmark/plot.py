"""Scatter plot of student latency against si-RMSE for Keras and each TFLite variant (PNG, PIL only).

    python -m benchmark.plot                      # benchmark/results/{latency,accuracy}.json
    python -m benchmark.plot --threads 1 --output latency_1thread.png
    python -m benchmark.plot --resolution_json docs/results/phone_path/resolution.json  # network sizes
    python -m benchmark.plot --smoke              # a sample plot from built-in numbers

Reads the JSON of ``benchmark.latency`` (median ms of the ``student`` rows at ``--threads``) and of
``benchmark.accuracy`` (si_rmse per variant), and draws one labelled point per variant present in
both; or, with ``--resolution_json``, one point per network size and mode of
``benchmark.resolution``. Drawn with Pillow's ImageDraw: matplotlib is not a dependency.
"""

import json
import math
import os

from absl import app, flags

from benchmark import common
from mdekd.atomic import atomic_path, prepare_file
from mdekd.cli import command

FLAGS = flags.FLAGS


def define_flags():
    """Command-line flags (defined only when run as a program, so modules import side-effect free)."""
    flags.DEFINE_string("results_dir", common.DEFAULT_OUTPUT_DIR, "Where latency.json and accuracy.json are.")
    flags.DEFINE_string("latency_json", None, "Default: <results_dir>/latency.json.")
    flags.DEFINE_string("accuracy_json", None, "Default: <results_dir>/accuracy.json.")
    flags.DEFINE_string("resolution_json", None, "Plot benchmark.resolution's exports (network size x "
                        "mode) instead of the latency/accuracy variants.")
    flags.DEFINE_integer("threads", None, "Latency at this thread count; default: the largest measured.")
    flags.DEFINE_string("output", None, "PNG path; default: <results_dir>/latency_vs_si_rmse.png.")
    flags.DEFINE_bool("smoke", False, "Plot built-in sample numbers (no JSON needed).")

WIDTH, HEIGHT = 800, 560
MARGIN = {"left": 110, "right": 40, "top": 60, "bottom": 70}
COLOURS = {"keras": (90, 90, 90), "fp32": (31, 119, 180), "fp16": (44, 160, 44),
           "dynamic": (255, 127, 14), "int8": (214, 39, 40)}
SAMPLE_POINTS = [  # smoke mode only: shape of a real result, not a measurement
    {"variant": "keras", "latency_ms": 41.0, "si_rmse": 0.300},
    {"variant": "fp32", "latency_ms": 26.0, "si_rmse": 0.300},
    {"variant": "fp16", "latency_ms": 26.5, "si_rmse": 0.3001},
    {"variant": "dynamic", "latency_ms": 48.0, "si_rmse": 0.302},
    {"variant": "int8", "latency_ms": 9.5, "si_rmse": 0.304},
]


def collect_points(latency, accuracy, threads=None, model="student"):
    """[{variant, latency_ms, si_rmse}] for the variants in both payloads, at ``threads``."""
    rows = [r for r in latency["results"] if r["model"] == model]
    if not rows:
        raise ValueError(f"latency results have no {model!r} rows")
    available = sorted({r["threads"] for r in rows})
    threads = threads or max(available)
    if threads not in available:
        raise ValueError(f"--threads {threads}: latency was measured with {available} threads")
    latency_ms = {r["variant"]: r["median_ms"] for r in rows if r["threads"] == threads}
    points = [{"variant": a["variant"], "latency_ms": latency_ms[a["variant"]], "si_rmse": a["metrics"]["si_rmse"]}
              for a in accuracy["results"] if a["variant"] in latency_ms]
    if not points:
        raise ValueError("no variant has both a latency and an accuracy result")
    return points, threads


def resolution_points(resolution):
    """[{variant, label, latency_ms, si_rmse}] of a ``benchmark.resolution`` payload: one point per
    network size and mode, labelled with the size."""
    points = [{"variant": "fp32" if r["mode"] == "none" else r["mode"],
               "label": f"{r['network_size'][0]}x{r['network_size'][1]}",
               "latency_ms": r["median_ms"], "si_rmse": r["metrics"]["si_rmse"]} for r in resolution["results"]]
    if not points:
        raise ValueError("resolution results are empty")
    return points


def nice_ticks(low, high, count=5):
    """About ``count`` round tick values covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"cannot scale an axis over [{low}, {high}]")
    if high <= low:
        pad = abs(low) * 0.05 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable built-in font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def _label(value, step):
    """``value`` with as many decimals as the tick step needs (0.25 -> 2, 5e-05 -> 5)."""
    exponent = math.floor(math.log10(step))
    mantissa = step / 10**exponent
    decimals = max(0, -exponent + (1 if abs(mantissa - round(mantissa)) > 1e-9 else 0))
    return f"{value:.{decimals}f}"


def draw_plot(points, title, path):
    """Write the scatter plot PNG (WIDTH×HEIGHT) of ``points`` to ``path``; returns the path."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(13)
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]
    xs = [p["latency_ms"] for p in points]
    ys = [p["si_rmse"] for p in points]
    x_ticks = nice_ticks(0.0, max(xs) * 1.1)
    y_pad = 0.08 * (max(ys) - min(ys)) or 0.01 * abs(max(ys)) or 0.01  # keep points off the frame
    y_ticks = nice_ticks(min(ys) - y_pad, max(ys) + y_pad)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def to_pixel(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    for x in x_ticks:  # grid and ticks
        px, _ = to_pixel(x, y0)
        draw.line([(px, top), (px, bottom)], fill=(230, 230, 230))
        draw.line([(px, bottom), (px, bottom + 5)], fill="black")
        draw.text((px, bottom + 8), _label(x, x_ticks[1] - x_ticks[0]), fill="black", font=small, anchor="ma")
    for y in y_ticks:
        _, py = to_pixel(x0, y)
        draw.line([(left, py), (right, py)], fill=(230, 230, 230))
        draw.line([(left - 5, py), (left, py)], fill="black")
        draw.text((left - 8, py), _label(y, y_ticks[1] - y_ticks[0]), fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, HEIGHT - 22), "median latency, ms (lower is better)", fill="black",
              font=font, anchor="ms")
    y_title = Image.new("RGB", (bottom - top, 24), "white")
    ImageDraw.Draw(y_title).text(((bottom - top) / 2, 12), "si-RMSE (lower is better)", fill="black",
                                 font=font, anchor="mm")
    image.paste(y_title.rotate(90, expand=True), (8, top))
    draw.text((WIDTH / 2, 24), title, fill="black", font=font, anchor="mm")
    for p in points:
        px, py = to_pixel(p["latency_ms"], p["si_rmse"])
        colour = COLOURS.get(p["variant"], (0, 0, 0))
        draw.ellipse([px - 6, py - 6, px + 6, py + 6], fill=colour, outline="black")
        label = f"{p.get('label', p['variant'])} {p['latency_ms']:.1f} ms"
        # int8 labels below their point, the others above: variants of one size sit close together
        label_y = py + 4 if p["variant"] == "int8" else py - 20
        if px + 9 + draw.textlength(label, font=small) > right:  # keep the label inside the frame
            draw.text((px - 9, label_y), label, fill=colour, font=small, anchor="ra")
        else:
            draw.text((px + 9, label_y), label, fill=colour, font=small)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as temporary:
        image.save(temporary)
    return path


@command("benchmark.plot", errors=(KeyError,))
def main(argv):
    output = FLAGS.output or os.path.join(FLAGS.results_dir, "latency_vs_si_rmse.png")
    prepare_file(output, "--output")
    if FLAGS.smoke:
        points, title = SAMPLE_POINTS, "student: latency vs si-RMSE (sample numbers)"
    elif FLAGS.resolution_json:
        with open(FLAGS.resolution_json) as f:
            payload = json.load(f)
        points = resolution_points(payload)
        camera = payload["camera_size"]
        title = (f"student at {camera[0]}x{camera[1]}, network at each size (blue fp32, red int8): "
                 "latency vs si-RMSE")
    else:
        payloads = {}
        for name, path in (("latency", FLAGS.latency_json), ("accuracy", FLAGS.accuracy_json)):
            path = path or os.path.join(FLAGS.results_dir, f"{name}.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found: run python -m benchmark.{name} first")
            with open(path) as f:
                payloads[name] = json.load(f)
        points, threads = collect_points(payloads["latency"], payloads["accuracy"], FLAGS.threads)
        config = payloads["latency"].get("config", {})
        title = (f"student at {config.get('height')}x{config.get('width')}, {threads} thread"
                 f"{'s' if threads > 1 else ''}: latency vs si-RMSE")
    draw_plot(points, title, output)
    print(common.markdown_table(["variant", "latency ms", "si_rmse"],
                                [[p["variant"], common.fmt(p["latency_ms"], 1), common.fmt(p["si_rmse"], 4)]
                                 for p in points]))
    print(f"wrote {output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
