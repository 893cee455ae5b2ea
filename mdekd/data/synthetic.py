"""Procedural scenes with exact metric depth, written in the MAI2021 layout (design.md §3).

``render_scene`` ray-casts one frame with numpy (every pixel at once): an outdoor scene (ground
plane, sky, buildings, crates, balls, sun with shadows, haze) or a room (floor, walls, ceiling,
furniture boxes, balls, a ceiling lamp with shadows), seen by a pinhole camera with random
height, yaw, pitch, roll and horizontal field of view 50-80°. Surfaces carry procedural textures
in world coordinates (tiles, planks, façade windows, multi-octave value noise), so the image has
the monocular cues a network can learn: texture gradients and foreshortening, known object
sizes, occlusion, shading, cast shadows and aerial perspective. Textures are prefiltered by each
pixel's footprint on the surface so distant texture fades to its mean instead of aliasing.

Depth is **z-depth**: the distance along the optical axis (camera z) to the first surface hit by
the ray through the pixel centre, in metres, exact to float rounding (the ray is parametrised as
``origin + t · R (x_c, y_c, 1)`` so the hit parameter t is the z-depth itself). Sky is 0 and so
is geometry farther than MAX_DEPTH = 40 m: like a depth sensor with a 40 m cap, far ground and
far buildings are invalid rather than clamped. Files store depth as uint16 millimetres.

Every frame is seeded by ``(seed, split, index)``, so a dataset is identical whatever the
number of worker processes. Output goes to ``<output>.partial`` (each file written to a temp
name and renamed) and the folder is renamed to ``<output>`` only once complete, with a
``synthetic.json`` marker holding the parameters; an interrupted run resumes from the partial
folder, and an existing complete set with the same parameters is reused.

    python -m mdekd.data.synthetic --output data/synthetic --train 800 --validation 100 \\
        --height 256 --width 320 --seed 0 --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import pathlib
import shutil
import sys
import time
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from mdekd.atomic import atomic_path, prepare_directory, replace_directory
from mdekd.constants import MAX_DEPTH

RENDERER_VERSION = 1  # bump when rendering changes, so stale complete datasets are not reused
MARKER = "synthetic.json"
SPLITS = ("train", "validation")
_EPS = 1e-6
_NOISE_SIZE = 64  # value-noise lattice period (cells)


# --------------------------------------------------------------------------------------------
# scene description
# --------------------------------------------------------------------------------------------

class _Scene(NamedTuple):
    """What render_scene draws: a camera, axis-aligned planes, boxes and spheres, one light."""

    camera: dict  # position (3,), yaw/pitch/roll (rad)
    planes: list  # {"axis", "value", "sign" (normal along axis), "material"}
    boxes: list  # (lo (3,), hi (3,)) corners, metres
    box_materials: list
    spheres: list  # (centre (3,), radius)
    sphere_materials: list
    light: dict  # "sun" (direction) or "point" (position, falloff); colour, ambient
    sky: dict | None  # zenith/horizon colours and haze distance; None indoors


def _material(kind, colour, second=None, period=1.0, noise=0.15, noise_scale=1.0, extra=None):
    """Surface appearance: linear RGB albedo(s), a pattern period (m) and value-noise strength."""
    return {"kind": kind, "colour": np.asarray(colour, np.float64),
            "second": np.asarray(second if second is not None else colour, np.float64),
            "period": float(period), "noise": float(noise), "noise_scale": float(noise_scale),
            "extra": extra}


def _hsv(rng, hue, saturation, value):
    """Linear RGB from HSV ranges (each a (low, high) pair), for varied but plausible colours."""
    h, s, v = (rng.uniform(*r) for r in (hue, saturation, value))
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _place_around(rng, camera_xz, heading, spread, distance, half_size, keep_out):
    """A footprint centre (x, z) in the camera's view wedge whose box stays keep_out m from it."""
    for _ in range(20):
        angle = heading + rng.uniform(-spread, spread)
        d = rng.uniform(*distance)
        centre = camera_xz + d * np.array([math.sin(angle), math.cos(angle)])
        if np.max(np.abs(centre - camera_xz) - half_size) > keep_out:
            return centre
    return camera_xz + (distance[1] + np.max(half_size)) * np.array([math.sin(heading), math.cos(heading)])


def _footprint_box(centre, half, height):
    """(lo, hi) corners of a box standing on the ground: footprint centre (x, z) ± half, 0..height."""
    return [centre[0] - half[0], 0.0, centre[1] - half[1]], [centre[0] + half[0], height, centre[1] + half[1]]


def _outdoor_scene(rng, hfov) -> _Scene:
    """Ground plane, sky, buildings 10-38 m away, crates and balls 3-22 m away, sun and haze."""
    camera = {"height": rng.uniform(1.2, 2.6), "pitch": math.radians(rng.uniform(-16, 2)),
              "roll": math.radians(rng.uniform(-3, 3)), "yaw": rng.uniform(0, 2 * math.pi)}
    camera["position"] = np.array([rng.uniform(-50, 50), camera["height"], rng.uniform(-50, 50)])
    cam_xz = camera["position"][[0, 2]]
    spread = hfov / 2 + math.radians(15)
    ground_kind = rng.choice(["tiles", "grass", "asphalt"])
    if ground_kind == "tiles":
        base = _hsv(rng, (0.05, 0.12), (0.05, 0.3), (0.25, 0.5))
        ground = _material("checker", base, base * rng.uniform(0.55, 0.8), period=rng.uniform(0.4, 1.5), noise=0.2)
    elif ground_kind == "grass":
        ground = _material("noise", _hsv(rng, (0.2, 0.33), (0.4, 0.7), (0.15, 0.35)), noise=0.5,
                           noise_scale=rng.uniform(0.3, 1.2))
    else:
        grey = rng.uniform(0.08, 0.2)
        ground = _material("stripes", [grey] * 3, [0.8, 0.8, 0.7], period=rng.uniform(3.0, 6.0), noise=0.3,
                           noise_scale=0.25, extra={"line": 0.04})
    planes = [{"axis": 1, "value": 0.0, "sign": 1.0, "material": ground}]

    boxes, box_materials = [], []
    for _ in range(rng.integers(2, 7)):  # buildings
        half = np.array([rng.uniform(2, 7), rng.uniform(2, 7)])
        centre = _place_around(rng, cam_xz, camera["yaw"], spread, (10, 38), half, keep_out=3.0)
        height = rng.uniform(3, 20)
        boxes.append(_footprint_box(centre, half, height))
        wall = _hsv(rng, (0.0, 0.15), (0.05, 0.45), (0.25, 0.7))
        glass = _hsv(rng, (0.55, 0.65), (0.1, 0.4), (0.03, 0.15))
        box_materials.append(_material("windows", wall, glass, period=rng.uniform(1.8, 3.5), noise=0.15,
                                       extra={"floor": rng.uniform(2.8, 3.6)}))
    for _ in range(rng.integers(2, 7)):  # crates, cars, kiosks
        half = rng.uniform(0.3, 1.5, size=2)
        centre = _place_around(rng, cam_xz, camera["yaw"], spread, (3, 20), half, keep_out=1.0)
        height = rng.uniform(0.4, 2.5)
        boxes.append(_footprint_box(centre, half, height))
        colour = _hsv(rng, (0, 1), (0.3, 0.9), (0.2, 0.8))
        box_materials.append(_material(rng.choice(["noise", "checker"]), colour, colour * 0.6,
                                       period=rng.uniform(0.2, 0.6), noise=0.25, noise_scale=rng.uniform(0.3, 1.0)))
    spheres, sphere_materials = [], []
    for _ in range(rng.integers(1, 5)):
        radius = rng.uniform(0.25, 1.5)
        centre = _place_around(rng, cam_xz, camera["yaw"], spread, (3, 22), np.array([radius, radius]), keep_out=1.0)
        spheres.append(([centre[0], radius, centre[1]], radius))
        sphere_materials.append(_material("noise", _hsv(rng, (0, 1), (0.3, 0.9), (0.3, 0.8)), noise=0.2,
                                          noise_scale=rng.uniform(0.2, 0.6)))

    elevation, azimuth = math.radians(rng.uniform(20, 70)), rng.uniform(0, 2 * math.pi)
    light = {"kind": "sun", "direction": np.array([math.cos(elevation) * math.sin(azimuth), math.sin(elevation),
                                                    math.cos(elevation) * math.cos(azimuth)]),
             "colour": np.array([1.0, 0.95, 0.85]) * rng.uniform(0.9, 1.3), "ambient": rng.uniform(0.25, 0.45)}
    sky = {"zenith": _hsv(rng, (0.55, 0.64), (0.35, 0.7), (0.5, 0.85)),
           "horizon": _hsv(rng, (0.55, 0.64), (0.05, 0.2), (0.75, 0.95)),
           "fog_distance": rng.uniform(60, 250)}
    return _Scene(camera, planes, boxes, box_materials, spheres, sphere_materials, light, sky)


def _room_scene(rng, hfov) -> _Scene:
    """A closed room (3-8 m × 4-12 m × 2.4-3.4 m) with furniture boxes, balls and a ceiling lamp."""
    width, length, height = rng.uniform(3, 8), rng.uniform(4, 12), rng.uniform(2.4, 3.4)
    lo, hi = np.array([-width / 2, 0.0, 0.0]), np.array([width / 2, height, length])
    camera = {"height": rng.uniform(1.0, 1.7), "pitch": math.radians(rng.uniform(-20, 5)),
              "roll": math.radians(rng.uniform(-3, 3)), "yaw": math.radians(rng.uniform(-35, 35))}
    camera["position"] = np.array([rng.uniform(-width / 4, width / 4), camera["height"], rng.uniform(0.3, 1.0)])
    cam_xz = camera["position"][[0, 2]]

    if rng.random() < 0.5:
        wood = _hsv(rng, (0.05, 0.1), (0.4, 0.7), (0.2, 0.5))
        floor = _material("stripes", wood, wood * 0.5, period=rng.uniform(0.1, 0.25), noise=0.35,
                          noise_scale=0.15, extra={"line": 0.06})
    else:
        tile = _hsv(rng, (0, 1), (0.0, 0.3), (0.3, 0.8))
        floor = _material("checker", tile, tile * rng.uniform(0.4, 0.8), period=rng.uniform(0.3, 0.8), noise=0.1)
    planes = [{"axis": 1, "value": 0.0, "sign": 1.0, "material": floor},
              {"axis": 1, "value": height, "sign": -1.0, "material": _material("noise", [0.8, 0.8, 0.78], noise=0.05)}]
    for axis, value, sign in ((0, lo[0], 1.0), (0, hi[0], -1.0), (2, lo[2], 1.0), (2, hi[2], -1.0)):
        paint = _hsv(rng, (0, 1), (0.05, 0.35), (0.4, 0.85))
        kind = rng.choice(["noise", "noise", "stripes"])
        planes.append({"axis": axis, "value": value, "sign": sign,
                       "material": _material(kind, paint, paint * 0.8, period=rng.uniform(0.1, 0.4), noise=0.1,
                                             noise_scale=1.0, extra={"line": 0.0})})

    boxes, box_materials = [], []
    for _ in range(rng.integers(2, 7)):  # furniture
        half = rng.uniform(0.15, 1.0, size=2)
        box_height = rng.uniform(0.3, 2.0)
        for _ in range(20):
            centre = rng.uniform(lo[[0, 2]] + half, hi[[0, 2]] - half)
            if np.max(np.abs(centre - cam_xz) - half) > 0.8:
                break
        else:
            continue
        boxes.append(_footprint_box(centre, half, box_height))
        colour = _hsv(rng, (0, 1), (0.2, 0.8), (0.2, 0.8))
        box_materials.append(_material(rng.choice(["noise", "stripes", "checker"]), colour, colour * 0.6,
                                       period=rng.uniform(0.05, 0.3), noise=0.2, noise_scale=0.3, extra={"line": 0.05}))
    spheres, sphere_materials = [], []
    for _ in range(rng.integers(1, 4)):
        radius = rng.uniform(0.1, 0.5)
        for _ in range(20):
            centre = rng.uniform(lo[[0, 2]] + radius, hi[[0, 2]] - radius)
            if np.linalg.norm(centre - cam_xz) - radius > 0.8:
                break
        else:
            continue
        spheres.append(([centre[0], radius, centre[1]], radius))
        sphere_materials.append(_material("noise", _hsv(rng, (0, 1), (0.4, 0.9), (0.3, 0.9)), noise=0.15,
                                          noise_scale=0.1))

    lamp = np.array([rng.uniform(lo[0] + 0.3, hi[0] - 0.3), height - 0.05, rng.uniform(0.5, length - 0.5)])
    light = {"kind": "point", "position": lamp, "colour": np.array([1.0, 0.92, 0.8]) * rng.uniform(1.0, 1.6),
             "falloff": rng.uniform(3.0, 6.0), "ambient": rng.uniform(0.2, 0.35)}
    return _Scene(camera, planes, boxes, box_materials, spheres, sphere_materials, light, None)


# --------------------------------------------------------------------------------------------
# ray casting: rays are origin + t * direction with direction = R (x_c, y_c, 1), so t = z-depth
# --------------------------------------------------------------------------------------------

def _camera_rays(camera, height, width, focal):
    """(H*W, 3) world ray directions whose camera-z component is 1."""
    yaw, pitch, roll = camera["yaw"], camera["pitch"], camera["roll"]
    forward = np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    right0 = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])
    down0 = -np.cross(forward, right0)
    right = math.cos(roll) * right0 + math.sin(roll) * down0
    down = math.cos(roll) * down0 - math.sin(roll) * right0
    x_c = (np.arange(width) + 0.5 - width / 2) / focal
    y_c = (np.arange(height) + 0.5 - height / 2) / focal
    x_c, y_c = np.meshgrid(x_c, y_c)
    return x_c.reshape(-1, 1) * right + y_c.reshape(-1, 1) * down + forward


def _hit_planes(origin, directions, planes):
    """Per plane (t, valid) for axis-aligned planes facing the ray (inward for a room)."""
    hits = []
    for plane in planes:
        component = directions[:, plane["axis"]]
        facing = component * plane["sign"] < 0
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (plane["value"] - origin[..., plane["axis"]]) / component
        hits.append((t, facing & (t > _EPS)))
    return hits


def _components(vectors):
    """(N, 3) -> three contiguous (N,) arrays (per-axis loops beat strided axis=1 reductions)."""
    return [np.ascontiguousarray(vectors[:, a]) for a in range(3)]


def _inverse(direction_rows):
    return [1.0 / np.where(d == 0, 1e-300, d) for d in direction_rows]


def _hit_box(origin_rows, inverse_rows, lo, hi, t_max=None):
    """(t_near, hit, entry axis) of a ray/axis-aligned-box slab test for rays starting outside.

    origin_rows: per axis a scalar or an (N,) array; inverse_rows: per axis 1 / direction (N,).
    """
    t_near, t_far = np.full(len(inverse_rows[0]), -np.inf), np.full(len(inverse_rows[0]), np.inf)
    entry = np.zeros(len(inverse_rows[0]), np.int64)
    for a in range(3):
        t1, t2 = (lo[a] - origin_rows[a]) * inverse_rows[a], (hi[a] - origin_rows[a]) * inverse_rows[a]
        near = np.minimum(t1, t2)
        entry[near > t_near] = a
        np.maximum(t_near, near, out=t_near)
        np.minimum(t_far, np.maximum(t1, t2), out=t_far)
    hit = (t_near <= t_far) & (t_near > _EPS)
    if t_max is not None:
        hit &= t_near < t_max
    return t_near, hit, entry


def _hit_sphere(origin_rows, direction_rows, centre, radius, t_max=None):
    """(t, hit) of the first ray/sphere intersection in front of the origin."""
    offset = [origin_rows[a] - centre[a] for a in range(3)]
    a_ = sum(d * d for d in direction_rows)
    b = sum(o * d for o, d in zip(offset, direction_rows))
    c = sum(o * o for o in offset) - radius ** 2
    disc = b * b - a_ * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a_
    hit = (disc > 0) & (t > _EPS)
    if t_max is not None:
        hit &= t < t_max
    return t, hit


def _cast(origin, directions, planes, boxes, spheres):
    """Nearest hit of each ray: t (N,) (inf = none), object id (N,) (-1 = none), normal (N, 3), face axis."""
    n = len(directions)
    best_t, best_id = np.full(n, np.inf), np.full(n, -1)
    normal, axis = np.zeros((n, 3)), np.full(n, 3)
    direction_rows = _components(directions)
    inverse_rows = _inverse(direction_rows)
    object_id = 0
    for plane, (t, valid) in zip(planes, _hit_planes(origin, directions, planes)):
        closer = valid & (t < best_t)
        best_t[closer], best_id[closer], axis[closer] = t[closer], object_id, plane["axis"]
        normal[closer] = 0.0
        normal[closer, plane["axis"]] = plane["sign"]
        object_id += 1
    for lo, hi in boxes:
        t, hit, entry = _hit_box(origin, inverse_rows, lo, hi)
        closer = hit & (t < best_t)
        best_t[closer], best_id[closer], axis[closer] = t[closer], object_id, entry[closer]
        normal[closer] = 0.0
        rows = np.nonzero(closer)[0]
        normal[rows, entry[rows]] = -np.sign(directions[rows, entry[rows]])
        object_id += 1
    for centre, radius in spheres:
        t, hit = _hit_sphere(origin, direction_rows, centre, radius)
        closer = hit & (t < best_t)
        best_t[closer], best_id[closer], axis[closer] = t[closer], object_id, 3
        normal[closer] = (origin + t[closer, None] * directions[closer] - np.asarray(centre)) / radius
        object_id += 1
    return best_t, best_id, normal, axis


def _in_shadow(points, to_light, distance, boxes, spheres):
    """True where the segment from a surface point towards the light is blocked by an object."""
    blocked = np.zeros(len(points), bool)
    point_rows, direction_rows = _components(points), _components(to_light)
    inverse_rows = _inverse(direction_rows)
    for lo, hi in boxes:
        blocked |= _hit_box(point_rows, inverse_rows, lo, hi, t_max=distance)[1]
    for centre, radius in spheres:
        blocked |= _hit_sphere(point_rows, direction_rows, centre, radius, t_max=distance)[1]
    return blocked


# --------------------------------------------------------------------------------------------
# textures, prefiltered by the pixel footprint (m) so far texture fades instead of aliasing
# --------------------------------------------------------------------------------------------

def _fade(footprint, period):
    """1 while a pattern of this period (m) is resolved, 0 once a pixel covers half a period."""
    return np.clip(2.0 - 4.0 * footprint / period, 0.0, 1.0)


def _value_noise(u, v, table):
    """Smooth lattice noise in [0, 1] at (u, v) in lattice cells."""
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    iu, iv = iu.astype(np.int64) % _NOISE_SIZE, iv.astype(np.int64) % _NOISE_SIZE
    ju, jv = (iu + 1) % _NOISE_SIZE, (iv + 1) % _NOISE_SIZE
    top = table[iv, iu] * (1 - fu) + table[iv, ju] * fu
    bottom = table[jv, iu] * (1 - fu) + table[jv, ju] * fu
    return top * (1 - fv) + bottom * fv


def _fractal_noise(u, v, footprint, scale, table):
    """Three octaves of value noise (feature size ``scale`` m and halves), centred on 0."""
    total = np.zeros_like(u)
    for octave in range(3):
        size = scale / 2 ** octave
        octave_noise = _value_noise(u / size + 17.0 * octave, v / size, table) - 0.5
        total += 0.5 ** octave * _fade(footprint, 2 * size) * octave_noise
    return total


def _albedo(material, u, v, footprint, axis, table):
    """(N, 3) linear albedo of one material at surface coordinates (u, v) in metres."""
    colour, second, period = material["colour"], material["second"], material["period"]
    kind = material["kind"]
    if kind == "checker":
        parity = (np.floor(u / period) + np.floor(v / period)) % 2
        mean = (colour + second) / 2
        albedo = mean + (colour - second) / 2 * ((1 - 2 * parity) * _fade(footprint, 2 * period))[:, None]
    elif kind == "stripes":  # planks / lanes: per-stripe tone and dark gaps
        index = np.floor(u / period).astype(np.int64)
        tone = table[index % _NOISE_SIZE, 7] - 0.5
        albedo = colour * (1 + 0.5 * tone * _fade(footprint, 2 * period))[:, None]
        line = (material["extra"] or {}).get("line", 0.0)
        if line:
            in_gap = (u / period - index) < line
            albedo = np.where(in_gap[:, None] & (_fade(footprint, period * line * 4) > 0.5)[:, None], second, albedo)
    elif kind == "windows":
        floor = material["extra"]["floor"]
        cell_u, cell_v = u / period, v / floor
        fu, fv = cell_u - np.floor(cell_u), cell_v - np.floor(cell_v)
        window = (fu > 0.25) & (fu < 0.75) & (fv > 0.3) & (fv < 0.8) & (axis != 1) & (v > 1.0)
        lit = table[np.floor(cell_u).astype(np.int64) % _NOISE_SIZE, np.floor(cell_v).astype(np.int64) % _NOISE_SIZE]
        glass = second * (0.6 + 0.8 * lit[:, None])
        weight = (window * _fade(footprint, period))[:, None]
        coverage = 0.5 * 0.5 * (1 - _fade(footprint, period))[:, None]  # mean window share when unresolved
        albedo = colour * (1 - weight - coverage) + glass * (weight + coverage)
    else:
        albedo = np.broadcast_to(colour, (len(u), 3))
    noise = _fractal_noise(u, v, footprint, material["noise_scale"], table)
    return np.clip(albedo * (1 + 2 * material["noise"] * noise)[:, None], 0.0, 1.0)


def _surface_coordinates(points, axis, centre_of):
    """(u, v) in metres on each face: the two world axes in its plane; v is height on walls."""
    u = np.where(axis == 0, points[:, 2], points[:, 0])
    v = np.where(axis == 1, points[:, 2], points[:, 1])
    sphere = axis == 3
    if sphere.any():
        d = points[sphere] - centre_of[sphere]
        radius = np.linalg.norm(d, axis=1)
        u[sphere] = np.arctan2(d[:, 2], d[:, 0]) * radius
    return u, v


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------

def render_scene(seed_or_rng, height: int, width: int):
    """Render one random scene.

    seed_or_rng: an int / SeedSequence / sequence of ints, or a ``numpy.random.Generator``.
    Returns ``rgb`` (H, W, 3) uint8 and ``depth`` (H, W) float32 z-depth in metres,
    0 = sky or farther than MAX_DEPTH.
    """
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
    hfov = math.radians(rng.uniform(50, 80))
    focal = width / 2 / math.tan(hfov / 2)
    outdoor = rng.random() < 0.5
    scene = (_outdoor_scene if outdoor else _room_scene)(rng, hfov)
    camera, planes, boxes, spheres, light, sky = (
        scene.camera, scene.planes, scene.boxes, scene.spheres, scene.light, scene.sky)
    table = rng.random((_NOISE_SIZE, _NOISE_SIZE))

    origin = camera["position"]
    directions = _camera_rays(camera, height, width, focal)
    t, object_id, normal, axis = _cast(origin, directions, planes, boxes, spheres)
    hit = object_id >= 0
    ray_length = np.linalg.norm(directions, axis=1)

    materials = [p["material"] for p in planes] + scene.box_materials + scene.sphere_materials
    sphere_centres = np.array([c for c, _ in spheres]).reshape(-1, 3)
    first_sphere = len(planes) + len(boxes)
    colour = np.zeros((len(t), 3))

    rows = np.nonzero(hit)[0]
    points = origin + t[rows, None] * directions[rows]
    n = normal[rows]
    cosine = np.abs(np.einsum("ij,ij->i", n, directions[rows])) / ray_length[rows]
    footprint = t[rows] * ray_length[rows] / focal / np.maximum(cosine, 0.1)
    centre_of = np.zeros_like(points)
    is_sphere = object_id[rows] >= first_sphere
    centre_of[is_sphere] = sphere_centres[object_id[rows][is_sphere] - first_sphere]
    u, v = _surface_coordinates(points, axis[rows], centre_of)
    albedo = np.zeros_like(points)
    for index in np.unique(object_id[rows]):
        mine = object_id[rows] == index
        albedo[mine] = _albedo(materials[index], u[mine], v[mine], footprint[mine], axis[rows][mine], table)

    if light["kind"] == "sun":
        to_light = np.broadcast_to(light["direction"], points.shape)
        distance = np.full(len(points), np.inf)
        falloff = 1.0
    else:
        offset = light["position"] - points
        distance = np.linalg.norm(offset, axis=1)
        to_light = offset / distance[:, None]
        falloff = 1.0 / (1.0 + (distance / light["falloff"]) ** 2)
    lambert = np.clip(np.einsum("ij,ij->i", n, to_light), 0.0, None)
    lit = lambert > 0
    shadow = np.zeros(len(points), bool)
    shadow[lit] = _in_shadow(points[lit] + 1e-4 * n[lit], to_light[lit], distance[lit], boxes, spheres)
    diffuse = (lambert * falloff * ~shadow)[:, None] * light["colour"]
    shade = albedo * (light["ambient"] + diffuse)

    if sky is not None:
        up = np.clip(directions[:, 1] / ray_length, 0.0, 1.0)[:, None]
        sky_colour = sky["horizon"] * (1 - up) + sky["zenith"] * up
        haze = (1 - np.exp(-t[rows] * ray_length[rows] / sky["fog_distance"]))[:, None]
        shade = shade * (1 - haze) + sky_colour[rows] * haze
        colour[:] = sky_colour
    colour[rows] = shade

    image = np.clip(colour, 0.0, 1.0) ** (1 / 2.2)  # linear -> display gamma
    image = image + rng.normal(0.0, 0.008, image.shape)  # sensor noise
    rgb = np.clip(np.round(image * 255), 0, 255).astype(np.uint8).reshape(height, width, 3)
    depth = np.where(hit & (t <= MAX_DEPTH), t, 0.0).astype(np.float32).reshape(height, width)
    return rgb, depth


# --------------------------------------------------------------------------------------------
# dataset generation
# --------------------------------------------------------------------------------------------

def frame_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of one frame: a function of (seed, split, index) only, not of the worker count."""
    return np.random.SeedSequence([seed, SPLITS.index(split), index])


def _save_png(array, path: pathlib.Path) -> None:
    with atomic_path(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG", compress_level=3)


def _render_and_write(task) -> None:
    folder, split, index, seed, height, width = task
    rgb, depth = render_scene(frame_seed(seed, split, index), height, width)
    millimetres = np.round(depth.astype(np.float64) * 1000.0).astype(np.uint16)  # MAI2021: uint16 mm
    name = f"{index:06d}.png"
    _save_png(millimetres, pathlib.Path(folder, split, "depth", name))
    _save_png(rgb, pathlib.Path(folder, split, "rgb", name))  # written last: a frame exists iff its RGB does


def _parameters(train, validation, height, width, seed):
    return {"generator": "mdekd.data.synthetic", "version": RENDERER_VERSION, "train": train,
            "validation": validation, "height": height, "width": width, "seed": seed}


def is_complete(output, train, validation, height, width, seed) -> bool:
    """True when ``output`` holds a complete dataset generated with exactly these parameters."""
    marker = pathlib.Path(output) / MARKER
    try:
        return json.loads(marker.read_text()) == _parameters(train, validation, height, width, seed)
    except (OSError, ValueError):
        return False


def generate_dataset(output, train: int, validation: int, height: int, width: int, seed: int = 0,
                     workers: int = 2, progress: bool = True, overwrite: bool = False) -> pathlib.Path:
    """Write ``<output>/{train,validation}/{rgb,depth}/<index:06d>.png`` (RGB 8-bit, depth uint16 mm).

    Reuses ``output`` if it already holds a complete set with the same parameters. Refuses an
    existing non-empty ``output`` otherwise, unless ``overwrite`` (then it is replaced once the
    new set is complete). Returns the output path.
    """
    for flag, value in (("train", train), ("validation", validation)):
        if value < 0:
            raise ValueError(f"--{flag} must be >= 0, got {value}")
    if height < 1 or width < 1:
        raise ValueError(f"--height and --width must be >= 1, got {height}x{width}")
    if train + validation < 1:
        raise ValueError("--train plus --validation must be at least 1 frame")
    output = pathlib.Path(output)
    parameters = _parameters(train, validation, height, width, seed)
    if is_complete(output, train, validation, height, width, seed):
        if progress:
            print(f"reusing the complete synthetic dataset in {output}", file=sys.stderr)
        return output
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        found = (f"it holds a synthetic set made with {(output / MARKER).read_text().strip()}"
                 if (output / MARKER).is_file() else f"it has no complete-set marker {MARKER}")
        raise FileExistsError(f"--output {output} exists and is not empty ({found}; asked for "
                              f"{json.dumps(parameters)}); pass --overwrite to replace it, or choose another --output")

    prepare_directory(output.parent, "--output")  # the parent may be a file or read-only
    partial = output.with_name(output.name + ".partial")
    partial_marker = partial / MARKER
    if partial.exists():
        try:
            same = json.loads(partial_marker.read_text()) == parameters
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(partial)
    for split, count in (("train", train), ("validation", validation)):
        for kind in ("rgb", "depth"):
            if count:  # an empty split gets no folder, so loading it fails as "split folder not found"
                (partial / split / kind).mkdir(parents=True, exist_ok=True)
    partial_marker.write_text(json.dumps(parameters))

    tasks = [(str(partial), split, index, seed, height, width)
             for split, count in (("train", train), ("validation", validation)) for index in range(count)
             if not (partial / split / "rgb" / f"{index:06d}.png").is_file()]  # resume an interrupted run
    bar = tqdm(total=train + validation, desc=f"synthetic {height}x{width}", unit="frame",
               disable=not progress, file=sys.stderr)
    bar.update(train + validation - len(tasks))
    if workers > 1 and len(tasks) > 1:
        # spawn: workers import only numpy/PIL, never inherit a (fork-unsafe) TensorFlow runtime
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            chunk = max(1, min(8, len(tasks) // (4 * workers)))
            for _ in pool.imap_unordered(_render_and_write, tasks, chunksize=chunk):
                bar.update(1)
    else:
        for task in tasks:
            _render_and_write(task)
            bar.update(1)
    bar.close()

    for stray in partial.rglob(".*.partial*"):  # temp files of a run killed mid-write
        stray.unlink()
    # the marker of a complete set; written before the rename, so <output> appears complete or not at all
    partial_marker.write_text(json.dumps(parameters))
    replace_directory(partial, output)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mdekd.data.synthetic",
                                     description="Render a synthetic RGB + metric depth dataset in the MAI2021 layout.")
    parser.add_argument("--output", required=True, help="dataset folder to create")
    parser.add_argument("--train", type=int, default=800, help="training frames (default 800)")
    parser.add_argument("--validation", type=int, default=100, help="validation frames (default 100)")
    parser.add_argument("--height", type=int, default=256, help="image height in pixels (default 256)")
    parser.add_argument("--width", type=int, default=320, help="image width in pixels (default 320)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, different --output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        output = generate_dataset(args.output, args.train, args.validation, args.height, args.width, args.seed,
                                  workers=args.workers, progress=not args.quiet, overwrite=args.overwrite)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    from mdekd.data.stats import describe_dataset, format_description

    print(f"{output} ({time.perf_counter() - start:.1f} s)")
    print(format_description(describe_dataset(output, "synthetic")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
