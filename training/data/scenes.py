"""``scenes``: procedurally rendered 3-D scenes with exact semantic labels, depth and normals.

The default benchmark (docs/design.md §6): a room (floor, back wall, two side walls) holding
a few objects (spheres, boxes rotated about the vertical axis, upright cylinders and cones),
seen by a pinhole camera and ray cast exactly, fully vectorized over pixels in numpy (one pass
per surface, no per-pixel Python loop).

Conventions
-----------
- World frame: ``X`` right, ``Y`` up, ``Z`` forward; the floor is the plane ``Y = 0``.
- Camera: at ``(0, height, 0)``, turned by ``yaw`` about the vertical and tilted down by
  ``pitch``; horizontal field of view ``hfov``; square pixels, focal length
  ``f = (W / 2) / tan(hfov / 2)`` and principal point at the image centre, so one scene renders
  consistently at any resolution ``(H, W)``. Rays go through pixel centres.
- Camera frame (the frame of the normals): OpenCV convention, ``x`` right, ``y`` down, ``z``
  along the optical axis.
- **Depth is z-depth**: the distance from the camera centre to the surface point measured along
  the optical axis (the ``z`` of the point in the camera frame), in the world's units (metres),
  *not* the length of the ray; this is what a depth sensor such as NYU-v2's Kinect reports.
  Every pixel sees a surface (the walls are unbounded upward), so depth is valid everywhere.
- **Normals**: unit vectors in the camera frame, oriented towards the camera side
  (``dot(normal, view_ray) < 0``).
- **Labels** (:data:`SCENE_CLASSES`): 0 floor, 1 wall, 2 sphere, 3 box, 4 cylinder, 5 cone.
- **Appearance**: Lambertian shading under one directional light with cast shadows from the
  objects, plus an ambient term. Every surface is textured in its own coordinates with its
  class's pattern (floor: rotated checker; walls: horizontal bands; spheres: stripes around a
  random axis; boxes: 3-D checker; cylinders: vertical stripes around the axis; cones: rings),
  each with a random frequency/phase within class-specific ranges, between two colours drawn
  at random for every object. So colour says nothing about the class and segmentation has to
  be learned from texture and shape. Per-pixel albedo noise and sensor noise are added.
- **Determinism**: image ``i`` of seed ``s`` (and stream ``k``) is drawn from
  ``np.random.default_rng(np.random.SeedSequence(s, spawn_key=(k, i)))``, so it does not
  depend on how many images are rendered; splits use different streams (train 0, val 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dymu.config import TaskSpec, dense_tasks
from dymu.normalization import DATASET_NORMALIZATION

from .base import ArrayDataset, DatasetError, MultiTaskDataset, Sample
from .npy_split import NpySplitDataset, read_meta

#: Class names by label index.
SCENE_CLASSES: tuple[str, ...] = ("floor", "wall", "sphere", "box", "cylinder", "cone")
SHAPES: tuple[str, ...] = ("sphere", "box", "cylinder", "cone")
SHAPE_CLASS: dict[str, int] = {s: SCENE_CLASSES.index(s) for s in SHAPES}
FLOOR, WALL = 0, 1
DEFAULT_SIZE: tuple[int, int] = (96, 128)
#: Random streams of the splits (see the module docstring).
SPLIT_STREAMS: dict[str, int] = {"train": 0, "val": 1}

_EPS = 1e-6
_INF = np.inf


@dataclass(frozen=True)
class Camera:
    """A pinhole camera standing in the room (angles in radians)."""

    height: float = 1.5
    pitch: float = 0.35
    yaw: float = 0.0
    hfov: float = 1.15


@dataclass(frozen=True)
class Room:
    """Floor ``Y = 0``, back wall ``Z = back``, side walls ``X = left`` and ``X = right``."""

    back: float = 8.0
    left: float = -3.5
    right: float = 3.5


@dataclass(frozen=True)
class Appearance:
    """A two-colour pattern: colours in [0, 1], the pattern's frequency (class-specific
    meaning), phase, and an angle or axis that orients it."""

    color_a: tuple[float, float, float] = (0.7, 0.7, 0.7)
    color_b: tuple[float, float, float] = (0.3, 0.3, 0.3)
    freq: float = 4.0
    phase: float = 0.0
    axis: tuple[float, float, float] = (0.0, 1.0, 0.0)


@dataclass(frozen=True)
class SceneObject:
    """An object resting on the floor at footprint centre ``(x, z)``.

    ``size``: sphere ``(r,)``; box half extents ``(ax, ay, az)`` (``ay`` is half the height);
    cylinder ``(r, h)``; cone ``(r, h)`` (base radius, height). ``yaw`` turns a box about the
    vertical axis.
    """

    shape: str
    x: float
    z: float
    size: tuple[float, ...]
    yaw: float = 0.0
    look: Appearance = field(default_factory=Appearance)

    @property
    def label(self) -> int:
        return SHAPE_CLASS[self.shape]

    @property
    def footprint(self) -> float:
        """Radius of a vertical cylinder around the object, for non-overlapping placement."""
        if self.shape == "box":
            return math.hypot(self.size[0], self.size[2])
        return float(self.size[0])


@dataclass(frozen=True)
class Scene:
    """Everything that fixes one rendered image (noise aside)."""

    camera: Camera = field(default_factory=Camera)
    room: Room = field(default_factory=Room)
    objects: tuple[SceneObject, ...] = ()
    light: tuple[float, float, float] = (0.3, 0.8, -0.5)  # towards the light, world frame
    ambient: float = 0.35
    floor_look: Appearance = field(default_factory=Appearance)
    wall_look: Appearance = field(default_factory=Appearance)


# ------------------------------------------------------------------------------------ camera


def camera_pose(camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """``(M, origin)``: ``M`` (3, 3) has the camera axes (x right, y down, z forward) as columns
    in world coordinates, so ``p_world = origin + M @ p_cam`` and ``n_cam = M.T @ n_world``."""
    sy, cy = math.sin(camera.yaw), math.cos(camera.yaw)
    sp, cp = math.sin(camera.pitch), math.cos(camera.pitch)
    forward = np.array([sy * cp, -sp, cy * cp])
    right = np.array([cy, 0.0, -sy])
    down = -np.array([sy * sp, cp, cy * sp])
    return np.stack([right, down, forward], axis=1), np.array([0.0, camera.height, 0.0])


def focal_length(camera: Camera, size: Sequence[int]) -> float:
    """Focal length in pixels: ``(W / 2) / tan(hfov / 2)``."""
    return 0.5 * size[1] / math.tan(0.5 * camera.hfov)


def pixel_rays(camera: Camera, size: Sequence[int]) -> np.ndarray:
    """Camera-frame ray directions through the pixel centres, ``(H, W, 3)`` with ``z = 1``:
    the point seen at depth ``d`` is ``d * ray``."""
    h, w = int(size[0]), int(size[1])
    f = focal_length(camera, size)
    u = (np.arange(w) + 0.5 - 0.5 * w) / f
    v = (np.arange(h) + 0.5 - 0.5 * h) / f
    rays = np.empty((h, w, 3))
    rays[..., 0] = u[None, :]
    rays[..., 1] = v[:, None]
    rays[..., 2] = 1.0
    return rays


# ------------------------------------------------------------------------------ intersections
# Each returns (t, part): the ray parameter of the first hit (inf for a miss) for rays
# orig + t * dirs, t > eps, and which part of the surface was hit (int8; 0 unless stated).


def _plane(o_axis: np.ndarray, d_axis: np.ndarray, value: float, sign: int) -> np.ndarray:
    """Planes ``axis = value`` seen from the side where ``sign * d_axis > 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (value - o_axis) / d_axis
    return np.where((sign * d_axis > 0) & (t > _EPS), t, _INF)


def _sphere(obj: SceneObject, orig: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, None]:
    r = obj.size[0]
    oc = orig - np.array([obj.x, r, obj.z])
    a = np.einsum("ij,ij->i", dirs, dirs)
    b = np.einsum("ij,ij->i", oc, dirs) if oc.ndim == 2 else dirs @ oc
    c = (np.einsum("ij,ij->i", oc, oc) if oc.ndim == 2 else oc @ oc) - r * r
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    t0, t1 = (-b - sq) / a, (-b + sq) / a
    t = np.where(t0 > _EPS, t0, t1)
    return np.where((disc >= 0) & (t > _EPS), t, _INF), None


def _yaw_frame(yaw: float) -> np.ndarray:
    """Columns: the object's local x, y, z axes in world coordinates."""
    s, c = math.sin(yaw), math.cos(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _box(obj: SceneObject, orig: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, None]:
    ax, ay, az = obj.size
    rot = _yaw_frame(obj.yaw)
    ol = (orig - np.array([obj.x, ay, obj.z])) @ rot
    dl = dirs @ rot
    e = np.array([ax, ay, az])
    tnear, tfar = None, None
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(3):  # the slab method; fmin/fmax skip the NaN of 0 * inf
            inv = 1.0 / dl[:, k]
            t1 = (-e[k] - ol[..., k]) * inv
            t2 = (e[k] - ol[..., k]) * inv
            lo, hi = np.fmin(t1, t2), np.fmax(t1, t2)
            tnear = lo if tnear is None else np.fmax(tnear, lo)
            tfar = hi if tfar is None else np.fmin(tfar, hi)
    hit = (tfar >= tnear) & (tfar > _EPS)
    t = np.where(tnear > _EPS, tnear, tfar)
    return np.where(hit, t, _INF), None


def _cylinder(
    obj: SceneObject, orig: np.ndarray, dirs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    r, h = obj.size
    qx = orig[..., 0] - obj.x
    qz = orig[..., 2] - obj.z
    oy = orig[..., 1]
    dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    a = dx * dx + dz * dz
    b = qx * dx + qz * dz
    c = qx * qx + qz * qz - r * r
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - sq) / a
        t_cap = (h - oy) / dy
    y_side = oy + t_side * dy
    side_ok = (disc >= 0) & (a > 0) & (t_side > _EPS) & (y_side >= 0) & (y_side <= h)
    cx = qx + t_cap * dx
    cz = qz + t_cap * dz
    cap_ok = (t_cap > _EPS) & (cx * cx + cz * cz <= r * r)
    ts = np.where(side_ok, t_side, _INF)
    tc = np.where(cap_ok, t_cap, _INF)
    return np.minimum(ts, tc), (tc < ts).astype(np.int8)


def _cone(obj: SceneObject, orig: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, None]:
    r, h = obj.size
    k2 = (r / h) ** 2
    qx = orig[..., 0] - obj.x
    qy = orig[..., 1] - h  # relative to the apex
    qz = orig[..., 2] - obj.z
    dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    a = dx * dx + dz * dz - k2 * dy * dy
    b = qx * dx + qz * dz - k2 * qy * dy
    c = qx * qx + qz * qz - k2 * qy * qy
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    small = np.abs(a) < 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        a_safe = np.where(small, 1.0, a)
        r0 = np.where(small, -c / (2 * b), (-b - sq) / a_safe)
        r1 = np.where(small, _INF, (-b + sq) / a_safe)
    best = np.full(a.shape, _INF)
    for t in (r0, r1):
        y = qy + t * dy
        ok = (disc >= 0) & (t > _EPS) & (y <= 0) & (y >= -h)
        best = np.where(ok & (t < best), t, best)
    return best, None


_INTERSECT = {"sphere": _sphere, "box": _box, "cylinder": _cylinder, "cone": _cone}


def _object_normals(obj: SceneObject, p: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Outward world-frame unit normals of ``obj`` at surface points ``p`` (N, 3)."""
    if obj.shape == "sphere":
        n = (p - np.array([obj.x, obj.size[0], obj.z])) / obj.size[0]
    elif obj.shape == "box":
        e = np.array(obj.size)
        rot = _yaw_frame(obj.yaw)
        pl = (p - np.array([obj.x, obj.size[1], obj.z])) @ rot
        face = np.argmax(np.abs(pl) / e, axis=-1)
        nl = np.zeros_like(pl)
        nl[np.arange(len(pl)), face] = np.sign(pl[np.arange(len(pl)), face])
        n = nl @ rot.T
    elif obj.shape == "cylinder":
        n = np.stack([p[:, 0] - obj.x, np.zeros(len(p)), p[:, 2] - obj.z], axis=-1)
        n[part == 1] = (0.0, 1.0, 0.0)
    else:  # cone
        r, h = obj.size
        rx, rz = p[:, 0] - obj.x, p[:, 2] - obj.z
        rho = np.maximum(np.hypot(rx, rz), 1e-9)
        n = np.stack([rx / rho, np.full(len(p), r / h), rz / rho], axis=-1)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------- textures


def _soft_step(x: np.ndarray) -> np.ndarray:
    """A square wave from a sine, with slightly soft edges (cheap antialiasing)."""
    return np.clip(0.5 + 2.0 * x, 0.0, 1.0)


def _checker(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return ((np.floor(u) + np.floor(v)) % 2).astype(np.float64)


def _pattern(label: int, look: Appearance, p: np.ndarray, obj: SceneObject | None) -> np.ndarray:
    """The mixing weight in [0, 1] between ``color_a`` and ``color_b`` at points ``p``."""
    f, ph = look.freq, look.phase
    if label == FLOOR:
        c, s = math.cos(ph), math.sin(ph)  # the phase turns the checker
        return _checker((c * p[:, 0] + s * p[:, 2]) * f, (-s * p[:, 0] + c * p[:, 2]) * f)
    if label == WALL:
        return _soft_step(np.sin(2 * math.pi * f * p[:, 1] + ph))
    assert obj is not None
    if obj.shape == "sphere":
        u = (p - np.array([obj.x, obj.size[0], obj.z])) / obj.size[0]
        return _soft_step(np.sin(math.pi * f * (u @ np.array(look.axis)) + ph))
    if obj.shape == "box":
        pl = (p - np.array([obj.x, obj.size[1], obj.z])) @ _yaw_frame(obj.yaw)
        q = np.floor(pl * f + ph)
        return (q.sum(axis=-1) % 2).astype(np.float64)
    if obj.shape == "cylinder":
        ang = np.arctan2(p[:, 2] - obj.z, p[:, 0] - obj.x)
        return _soft_step(np.sin(round(f) * ang + ph))
    return _soft_step(np.sin(2 * math.pi * f * p[:, 1] + ph))  # cone: rings


# ---------------------------------------------------------------------------------- rendering


def render_scene(
    scene: Scene, size: Sequence[int] = DEFAULT_SIZE, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """Ray cast one scene at ``size = (H, W)``.

    Returns ``image`` (H, W, 3) float32 in [0, 1], ``label`` (H, W) uint8 (:data:`SCENE_CLASSES`),
    ``depth`` (H, W) float32 z-depth, ``normal`` (H, W, 3) float32 camera-frame unit normals
    facing the camera, and ``surface`` (H, W) int16: which surface each pixel sees (0 floor,
    1 back wall, 2 left wall, 3 right wall, 4 + k object k). With ``rng``, per-pixel albedo
    noise and sensor noise are drawn from it; without, the image is noise-free.
    """
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {(h, w)}")
    cam_axes, o = camera_pose(scene.camera)
    rays_c = pixel_rays(scene.camera, (h, w)).reshape(-1, 3)
    dirs = rays_c @ cam_axes.T
    n_pix = len(dirs)
    room = scene.room

    # Primary visibility: a z-buffer over the surfaces.
    t_best = _plane(np.full(n_pix, o[1]), dirs[:, 1], 0.0, -1)
    sid = np.zeros(n_pix, np.int16)
    part = np.zeros(n_pix, np.int8)
    planes = ((2, room.back, +1), (0, room.left, -1), (0, room.right, +1))
    for k, (axis, value, sign) in enumerate(planes, start=1):
        t = _plane(np.full(n_pix, o[axis]), dirs[:, axis], value, sign)
        closer = t < t_best
        t_best = np.where(closer, t, t_best)
        sid[closer] = k
    for k, obj in enumerate(scene.objects, start=4):
        t, pt = _INTERSECT[obj.shape](obj, o, dirs)
        closer = t < t_best
        t_best = np.where(closer, t, t_best)
        sid[closer] = k
        if pt is not None:
            part[closer] = pt[closer]
    if not np.isfinite(t_best).all():  # pragma: no cover - the room is closed
        raise RuntimeError("a ray escaped the room; check the camera and room")

    p = o + t_best[:, None] * dirs
    # Per-surface tables (label, colours, plane normals), gathered once by surface id.
    looks = [scene.floor_look, scene.wall_look, scene.wall_look, scene.wall_look]
    looks += [obj.look for obj in scene.objects]
    labels = np.array([FLOOR, WALL, WALL, WALL] + [obj.label for obj in scene.objects], np.uint8)
    colors_a = np.array([lk.color_a for lk in looks])
    colors_b = np.array([lk.color_b for lk in looks])
    normals_t = np.zeros((len(looks), 3))
    normals_t[:4] = ((0, 1, 0), (0, 0, -1), (1, 0, 0), (-1, 0, 0))
    label = labels[sid]
    normal_w = normals_t[sid]
    mix = np.empty(n_pix)
    order = np.argsort(sid, kind="stable")
    bounds = np.searchsorted(sid[order], np.arange(len(looks) + 1))
    for s in range(len(looks)):
        idx = order[bounds[s] : bounds[s + 1]]
        if len(idx) == 0:
            continue
        obj = scene.objects[s - 4] if s >= 4 else None
        ps = p[idx]
        if obj is not None:
            normal_w[idx] = _object_normals(obj, ps, part[idx])
        mix[idx] = _pattern(int(labels[s]), looks[s], ps, obj)
    # Face the camera (the closed room and convex objects already do; this guards grazing rays).
    facing = np.einsum("ij,ij->i", normal_w, dirs)
    normal_w[facing > 0] *= -1

    # Shading: Lambertian + ambient, with shadows cast by the objects.
    light = np.asarray(scene.light, dtype=np.float64)
    light = light / np.linalg.norm(light)
    lam = np.clip(normal_w @ light, 0.0, None)
    lit = np.flatnonzero(lam > 0)
    if len(lit) and scene.objects:
        origin = p[lit] + 1e-4 * normal_w[lit]
        light_dirs = np.broadcast_to(light, origin.shape)
        shadow = np.zeros(len(lit), bool)
        for k, obj in enumerate(scene.objects, start=4):
            t, _ = _INTERSECT[obj.shape](obj, origin, light_dirs)
            shadow |= np.isfinite(t) & (sid[lit] != k)
        lam[lit[shadow]] = 0.0
    color_a = colors_a[sid]
    albedo = color_a + mix[:, None] * (colors_b[sid] - color_a)
    if rng is not None:
        albedo = albedo * (1.0 + 0.06 * rng.standard_normal((n_pix, 3), dtype=np.float32))
    shade = scene.ambient + (1.0 - scene.ambient) * lam
    image = albedo * shade[:, None]
    if rng is not None:
        image = image + 0.015 * rng.standard_normal((n_pix, 3), dtype=np.float32)

    normal_c = normal_w @ cam_axes  # = (cam_axes.T @ n) per row
    return {
        "image": np.clip(image, 0.0, 1.0).astype(np.float32).reshape(h, w, 3),
        "label": label.reshape(h, w),
        "depth": t_best.astype(np.float32).reshape(h, w),  # t along rays with z = 1: z-depth
        "normal": normal_c.astype(np.float32).reshape(h, w, 3),
        "surface": sid.reshape(h, w),
    }


# ----------------------------------------------------------------------------------- sampling


def _color(rng: np.random.Generator) -> tuple[float, float, float]:
    """A random colour: uniform hue, moderate saturation and value."""
    hue, sat, val = rng.random(), rng.uniform(0.15, 0.85), rng.uniform(0.35, 0.95)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    rgb = val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (float(rgb[0]), float(rgb[1]), float(rgb[2]))


def _look(rng: np.random.Generator, freq: tuple[float, float]) -> Appearance:
    a = _color(rng)
    # The second colour: a random colour, pulled towards the first by a random amount, so the
    # pattern's contrast varies as well.
    b = np.array(_color(rng))
    pull = rng.uniform(0.0, 0.6)
    b = (1 - pull) * b + pull * np.array(a)
    axis = rng.standard_normal(3)
    return Appearance(
        color_a=a,
        color_b=(float(b[0]), float(b[1]), float(b[2])),
        freq=float(rng.uniform(*freq)),
        phase=float(rng.uniform(0, 2 * math.pi)),
        axis=tuple(float(x) for x in axis / np.linalg.norm(axis)),
    )


#: Pattern frequency ranges per class (units: see :func:`_pattern`).
_FREQ = {
    "floor": (0.8, 2.2),  # checker tiles per metre
    "wall": (1.2, 3.5),  # bands per metre of height
    "sphere": (2.0, 5.0),  # stripes across the diameter
    "box": (4.0, 9.0),  # checker cells per metre
    "cylinder": (3.0, 8.0),  # stripes around the axis
    "cone": (3.0, 7.0),  # rings per metre of height
}


def sample_object(rng: np.random.Generator, shape: str, x: float, z: float) -> SceneObject:
    """A random object of ``shape`` at footprint centre ``(x, z)``."""
    u = rng.uniform
    if shape == "sphere":
        size: tuple[float, ...] = (u(0.3, 0.7),)
    elif shape == "box":
        size = (u(0.25, 0.6), u(0.2, 0.6), u(0.25, 0.6))
    elif shape == "cylinder":
        size = (u(0.2, 0.45), u(0.5, 1.6))
    else:
        size = (u(0.3, 0.6), u(0.6, 1.5))
    return SceneObject(
        shape, x, z, size, yaw=float(u(0, math.pi / 2)), look=_look(rng, _FREQ[shape])
    )


def sample_scene(rng: np.random.Generator, max_objects: int = 7) -> Scene:
    """A random scene: camera, room, light, and 3..``max_objects`` non-overlapping objects
    placed mostly inside the field of view."""
    u = rng.uniform
    camera = Camera(height=u(1.2, 1.8), pitch=u(0.2, 0.5), yaw=u(-0.2, 0.2), hfov=u(1.0, 1.25))
    room = Room(back=u(6.0, 10.0), left=-u(2.5, 4.5), right=u(2.5, 4.5))
    el, az = u(0.6, 1.25), u(0, 2 * math.pi)
    light = (math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az))
    objects: list[SceneObject] = []
    n_obj = int(rng.integers(3, max_objects + 1))
    for _ in range(n_obj):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        obj = sample_object(rng, shape, 0.0, 0.0)
        fp = obj.footprint
        for _try in range(20):
            z = u(1.6 + fp, min(room.back - fp - 0.05, 6.5))
            half = z * math.tan(0.5 * camera.hfov) * 0.85
            centre = z * math.tan(camera.yaw)
            x = u(
                max(centre - half, room.left + fp + 0.05),
                min(centre + half, room.right - fp - 0.05),
            )
            if all(math.hypot(x - q.x, z - q.z) > fp + q.footprint + 0.05 for q in objects):
                objects.append(SceneObject(shape, x, z, obj.size, obj.yaw, obj.look))
                break
    return Scene(
        camera=camera,
        room=room,
        objects=tuple(objects),
        light=light,
        ambient=float(u(0.25, 0.45)),
        floor_look=_look(rng, _FREQ["floor"]),
        wall_look=_look(rng, _FREQ["wall"]),
    )


def image_rng(seed: int, i: int, stream: int = 0) -> np.random.Generator:
    """The generator of image ``i`` (independent of how many images are rendered)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(stream), int(i))))


def render_scenes(
    n: int,
    seed: int = 0,
    size: Sequence[int] = DEFAULT_SIZE,
    *,
    stream: int = 0,
    start: int = 0,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Render images ``start .. start + n - 1`` of ``(seed, stream)`` at ``size = (H, W)``.

    Returns ``image`` (n, H, W, 3) float32 in [0, 1], ``label`` (n, H, W) uint8, ``depth``
    (n, H, W) float32 (z-depth, metres) and ``normal`` (n, H, W, 3) float32 (camera frame).
    """
    h, w = int(size[0]), int(size[1])
    if n < 0 or h < 1 or w < 1:
        raise ValueError(f"need n >= 0 and a positive size, got n={n}, size={(h, w)}")
    out = {
        "image": np.empty((n, h, w, 3), np.float32),
        "label": np.empty((n, h, w), np.uint8),
        "depth": np.empty((n, h, w), np.float32),
        "normal": np.empty((n, h, w, 3), np.float32),
    }
    indices = range(start, start + n)
    if progress:
        try:
            from tqdm import tqdm

            indices = tqdm(indices, desc="rendering", unit="img")
        except ImportError:  # pragma: no cover - tqdm is optional
            pass
    for j, i in enumerate(indices):
        rng = image_rng(seed, i, stream)
        r = render_scene(sample_scene(rng), (h, w), rng)
        for key in out:
            out[key][j] = r[key]
    return out


def scenes_tasks(classes: int = len(SCENE_CLASSES)) -> tuple[TaskSpec, ...]:
    """Segmentation (``classes`` classes), depth and normals, with NYU-v2's loss scales
    (seg 1, depth 3, normals 10; App. G)."""
    return dense_tasks(classes)


# ------------------------------------------------------------------------------------ dataset

#: Channel statistics of rendered images (measured on 2,000 images of seed 0 at 96x128),
#: used to normalize them to roughly zero mean and unit variance.
SCENES_MEAN, SCENES_STD = DATASET_NORMALIZATION["scenes"]
#: Images per split when generated in memory.
DEFAULT_N: dict[str, int] = {"train": 1000, "val": 250}
SPLITS: dict[str, str] = {"train": "train", "val": "val", "test": "val"}
LAYOUT = (
    "root=None to generate in memory, or <root>/{train,val} written by `dymu data scenes` "
    "(image/, label/, depth/, normal/ <i>.npy and meta.json)"
)


def _classes_from_meta(meta: dict) -> int:
    classes = meta.get("classes", SCENE_CLASSES)
    return int(classes) if isinstance(classes, int) else len(classes)


def build_scenes(
    split: str,
    root: str | Path | None = None,
    *,
    n: int | None = None,
    seed: int = 0,
    size: Sequence[int] | None = None,
    transform: Callable[[Sample], Sample] | None = None,
) -> MultiTaskDataset:
    """The ``scenes`` benchmark: generated in memory when ``root`` is None (``n`` images,
    default 1000 for train and 250 for val, of ``seed`` at ``size``, default 96x128; train and
    val come from different random streams), else read from ``<root>/<split>`` in the MTAN
    layout written by :func:`training.data.npy_split.write_split` (``size`` then resizes on load;
    the class count comes from ``meta.json``)."""
    if split not in SPLITS:
        raise DatasetError(f"scenes has splits train and val (test = val), not {split!r}")
    split = SPLITS[split]
    if root is not None:
        if n is not None:
            raise DatasetError("scenes: option n applies only when generating (root=None)")
        d = Path(root).expanduser() / split
        if not (d / "image").is_dir():
            raise DatasetError(f"no scenes split at {d}; expected {LAYOUT}")
        classes = _classes_from_meta(read_meta(d))
        return NpySplitDataset(
            d,
            scenes_tasks(classes),
            layout=LAYOUT,
            mean=SCENES_MEAN,
            std=SCENES_STD,
            size=size,
            transform=transform,
        )
    n = DEFAULT_N[split] if n is None else int(n)
    if n < 1:
        raise DatasetError(f"scenes: n must be >= 1, got {n}")
    arrays = render_scenes(
        n, seed, tuple(size) if size is not None else DEFAULT_SIZE, stream=SPLIT_STREAMS[split]
    )
    return ArrayDataset(
        scenes_tasks(),
        arrays["image"],
        {"segmentation": arrays["label"], "depth": arrays["depth"], "normals": arrays["normal"]},
        mean=SCENES_MEAN,
        std=SCENES_STD,
        transform=transform,
    )


def scenes_dataset_tasks(root: str | Path | None = None, **_: object) -> tuple[TaskSpec, ...]:
    """The tasks of :func:`build_scenes` (the class count from ``meta.json`` under ``root``)."""
    if root is None:
        return scenes_tasks()
    metas = [read_meta(Path(root).expanduser() / s) for s in ("train", "val")]
    meta = next((m for m in metas if m), {})
    return scenes_tasks(_classes_from_meta(meta))
