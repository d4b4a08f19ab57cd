"""The scenes generator: exact geometry (normals, depth, labels), determinism, any resolution."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.data import build_dataset, dataset_tasks
from training.data.scenes import (
    SCENE_CLASSES,
    Camera,
    Room,
    Scene,
    SceneObject,
    camera_pose,
    image_rng,
    pixel_rays,
    render_scene,
    render_scenes,
    sample_scene,
)

SIZE = (60, 80)
CAMERA = Camera(height=1.4, pitch=0.3, yaw=0.12, hfov=1.1)
SPHERE = SceneObject("sphere", x=0.4, z=3.5, size=(0.6,))


def _world_rays(camera: Camera, size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    M, o = camera_pose(camera)
    rays = pixel_rays(camera, size)
    return M, o, rays @ M.T


def test_camera_pose_is_a_rotation_looking_down_the_pitch():
    M, o = camera_pose(CAMERA)
    np.testing.assert_allclose(M.T @ M, np.eye(3), atol=1e-12)
    forward = M[:, 2]
    assert forward[1] == pytest.approx(-math.sin(CAMERA.pitch))  # tilted down
    assert M[1, 0] == pytest.approx(0.0)  # no roll: the x axis stays horizontal
    assert o[1] == CAMERA.height
    rays = pixel_rays(CAMERA, (4, 6))
    assert np.all(rays[..., 2] == 1.0)
    np.testing.assert_allclose(rays[:, :3, 0], -rays[:, :2:-1, 0])  # symmetric about the centre


def test_sphere_normals_depth_and_mask_are_exact():
    scene = Scene(camera=CAMERA, objects=(SPHERE,))
    out = render_scene(scene, SIZE)
    label, depth, normal = out["label"], out["depth"], out["normal"]
    M, o, dirs = _world_rays(CAMERA, SIZE)
    rays = pixel_rays(CAMERA, SIZE)

    # The pixels whose ray hits the sphere, solved independently here.
    c = np.array([SPHERE.x, SPHERE.size[0], SPHERE.z])
    oc = o - c
    a = (dirs * dirs).sum(-1)
    b = dirs @ oc
    disc = b * b - a * (oc @ oc - SPHERE.size[0] ** 2)
    hits = disc >= 0
    assert hits.sum() > 200
    np.testing.assert_array_equal(label == SCENE_CLASSES.index("sphere"), hits)
    np.testing.assert_array_equal(out["surface"] == 4, hits)

    t = (-b - np.sqrt(np.maximum(disc, 0))) / a
    np.testing.assert_allclose(depth[hits], t[hits], rtol=1e-6)
    # z-depth: the camera-frame point is depth * ray, and it lies on the sphere
    p_cam = depth[..., None] * rays
    c_cam = M.T @ (c - o)
    analytic = (p_cam - c_cam) / SPHERE.size[0]
    n = normal[hits]
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(n, analytic[hits], atol=2e-4)
    assert np.all((n * rays[hits]).sum(-1) < 0)  # towards the camera


def test_normals_are_unit_and_face_the_camera_everywhere():
    for i in range(4):
        rng = image_rng(3, i)
        scene = sample_scene(rng)
        out = render_scene(scene, SIZE, rng)
        n = out["normal"]
        np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
        assert np.all((n * pixel_rays(scene.camera, SIZE)).sum(-1) <= 0)


def test_floor_and_walls_have_their_plane_normals_and_depth():
    scene = Scene(camera=CAMERA, room=Room(back=7.0, left=-3.0, right=3.0))
    out = render_scene(scene, SIZE)
    M, o, dirs = _world_rays(CAMERA, SIZE)
    floor = out["label"] == 0
    assert floor.any() and (out["label"] == 1).any()
    up_cam = M.T @ np.array([0.0, 1.0, 0.0])
    np.testing.assert_allclose(
        out["normal"][floor], np.broadcast_to(up_cam, (floor.sum(), 3)), atol=1e-6
    )
    # the floor point at depth d is on Y = 0
    p_world = o + out["depth"][..., None] * dirs
    np.testing.assert_allclose(p_world[floor][:, 1], 0.0, atol=1e-5)
    back = out["surface"] == 1
    np.testing.assert_allclose(p_world[back][:, 2], 7.0, atol=1e-4)


@pytest.mark.parametrize("with_objects", [False, True])
def test_floor_depth_grows_towards_the_horizon(with_objects):
    scene = sample_scene(image_rng(11, 0)) if with_objects else Scene(camera=CAMERA)
    out = render_scene(scene, SIZE)
    floor = out["label"] == 0
    checked = 0
    for j in range(0, SIZE[1], 7):
        rows = np.flatnonzero(floor[:, j])
        if len(rows) < 2:
            continue
        d = out["depth"][rows, j]
        assert np.all(np.diff(d) < 0), f"column {j}: depth must fall as the row goes down"
        checked += 1
    assert checked >= 5
    # the floor fills the bottom of the image, not the top row
    assert floor[-1].all() and not floor[0].any()


def test_each_shape_labels_exactly_its_surface():
    shapes = (
        SceneObject("box", x=-0.8, z=3.0, size=(0.4, 0.3, 0.5), yaw=0.5),
        SceneObject("cylinder", x=0.9, z=3.2, size=(0.3, 1.0)),
        SceneObject("cone", x=0.0, z=4.5, size=(0.5, 1.2)),
    )
    out = render_scene(Scene(camera=CAMERA, objects=shapes), SIZE)
    for k, obj in enumerate(shapes):
        mask = out["surface"] == 4 + k
        assert mask.sum() > 30, obj.shape
        assert np.all(out["label"][mask] == SCENE_CLASSES.index(obj.shape))
    # the box's normals are its three face directions (turned by its yaw) seen from outside
    M, _, _ = _world_rays(CAMERA, SIZE)
    box_n = out["normal"][out["surface"] == 4] @ M.T  # back to the world frame
    s, c = math.sin(0.5), math.cos(0.5)
    faces = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    assert np.all(np.abs(box_n @ faces.T).max(axis=1) > 1 - 1e-5)
    # the cylinder's side normals are horizontal, its cap's vertical
    cyl_n = out["normal"][out["surface"] == 5] @ M.T
    assert np.all((np.abs(cyl_n[:, 1]) < 1e-5) | (np.abs(cyl_n[:, 1]) > 1 - 1e-5))


def test_determinism_and_image_i_independent_of_n():
    a = render_scenes(4, seed=7, size=(24, 32))
    b = render_scenes(4, seed=7, size=(24, 32))
    c = render_scenes(2, seed=7, size=(24, 32), start=2)
    d = render_scenes(6, seed=8, size=(24, 32))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k][2:], c[k])
    np.testing.assert_array_equal(
        render_scenes(1, seed=7, size=(24, 32))["image"][0], a["image"][0]
    )
    assert not np.array_equal(a["image"], d["image"][:4])


def test_any_resolution_and_array_formats():
    out = render_scenes(3, seed=1, size=(37, 53))
    assert out["image"].shape == (3, 37, 53, 3) and out["image"].dtype == np.float32
    assert out["label"].shape == (3, 37, 53) and np.issubdtype(out["label"].dtype, np.integer)
    assert out["depth"].shape == (3, 37, 53) and out["depth"].dtype == np.float32
    assert out["normal"].shape == (3, 37, 53, 3) and out["normal"].dtype == np.float32
    assert out["image"].min() >= 0.0 and out["image"].max() <= 1.0
    assert np.all(out["depth"] > 0)
    assert render_scenes(1, seed=1, size=(1, 1))["label"].shape == (1, 1, 1)


def test_classes_appear_and_colour_does_not_give_the_class_away():
    out = render_scenes(24, seed=0, size=(48, 64))
    counts = np.bincount(out["label"].ravel(), minlength=len(SCENE_CLASSES))
    assert len(counts) == len(SCENE_CLASSES) and np.all(counts > 0)
    # the mean colour of each object class varies a lot from image to image
    for cls in range(2, len(SCENE_CLASSES)):
        means = [
            out["image"][i][out["label"][i] == cls].mean(0)
            for i in range(24)
            if (out["label"][i] == cls).sum() > 20
        ]
        assert len(means) >= 3
        assert np.std(np.array(means), axis=0).max() > 0.05


def test_in_memory_dataset_samples_and_splits():
    train = build_dataset("scenes", "train", n=3, size=(24, 32))
    val = build_dataset("scenes", "val", n=3, size=(24, 32))
    assert [t.name for t in train.tasks] == ["segmentation", "depth", "normals"]
    assert {t.name: t.loss_scale for t in train.tasks} == {
        "segmentation": 1.0,
        "depth": 3.0,
        "normals": 10.0,
    }
    assert train.tasks == dataset_tasks("scenes")
    s = train[0]
    assert s["image"].shape == (3, 24, 32) and s["image"].dtype.is_floating_point
    assert s["segmentation"].shape == (24, 32) and str(s["segmentation"].dtype) == "torch.int64"
    assert s["depth"].shape == (1, 24, 32) and s["normals"].shape == (3, 24, 32)
    assert abs(float(s["image"].mean())) < 1.5
    assert not np.array_equal(train[0]["image"].numpy(), val[0]["image"].numpy())
    np.testing.assert_allclose(
        train.denormalize(s["image"]).permute(1, 2, 0).numpy(),
        render_scenes(1, 0, (24, 32))["image"][0],
        atol=1e-6,
    )
