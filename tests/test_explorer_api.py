"""What the explorer page needs from the service, over real HTTP: the cost map
(GET /v1/cost-map) and the page's own files. The page itself is driven in a real browser by
tests/test_explorer_browser.py."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import httpx
import pytest
import torch

import dymu
from dymu.errors import PreferenceError
from dymu.preference import normalize_preference, simplex_grid, simplex_grid_size
from service.client import DymuClient
from service.errors import BadRequestError
from service.metrics import Metrics
from service.runtime import MAX_COST_MAP_POINTS, LoadedModel
from service.server import BackgroundServer
from service.settings import Settings

from .conftest import randomize_, tiny_config
from .test_service import TASKS, running, save_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("costmap"))


@pytest.fixture(scope="module")
def model(store):
    return dymu.load(store, device="cpu")


@pytest.fixture(scope="module")
def server(store) -> Iterator[BackgroundServer]:
    with running(store) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> Iterator[DymuClient]:
    with DymuClient(server.url, timeout=30) as c:
        yield c


# ------------------------------------------------------------------------- the core pieces
def test_simplex_grid_is_every_point_k_over_resolution():
    grid = simplex_grid(3, 4)
    assert len(grid) == simplex_grid_size(3, 4) == 15
    assert grid[0] == (1.0, 0.0, 0.0) and grid[-1] == (0.0, 0.0, 1.0)
    assert len(set(grid)) == 15
    for r in grid:
        assert math.isclose(sum(r), 1.0) and all(v * 4 == round(v * 4) >= 0 for v in r)
    assert simplex_grid(2, 1) == [(1.0, 0.0), (0.0, 1.0)]
    assert simplex_grid_size(20, 3) == math.comb(22, 19) == len(simplex_grid(20, 3))
    with pytest.raises(PreferenceError, match="resolution"):
        simplex_grid(3, 0)


def test_batched_architectures_equal_one_by_one(tiny_model):
    prefs = [
        normalize_preference(r, c, tiny_model.tasks)
        for c in (0.0, 0.4, 1.0)
        for r in simplex_grid(3, 6)
    ]
    batched = tiny_model.architectures(prefs)
    assert [a.parents for a in batched] == [tiny_model.architecture(p).parents for p in prefs]
    assert len({a.id for a in batched}) > 1  # the randomized controller gives several trees
    assert tiny_model.architectures([]) == []


def test_cost_map_point_limit_is_checked_before_the_grid_is_built():
    torch.manual_seed(0)
    model = randomize_(dymu.create_model(tiny_config(n_tasks=6)))
    lm = LoadedModel(model, Settings(backend="torch"), Metrics())
    assert lm.cost_map(0.5, 3).n_points == math.comb(8, 5)
    with pytest.raises(BadRequestError, match=r"15,504 points on the 6-task simplex"):
        lm.cost_map(0.5, 15)  # C(20, 5) = 15,504 > MAX_COST_MAP_POINTS
    assert simplex_grid_size(3, 100) == MAX_COST_MAP_POINTS


def test_the_served_model_is_frozen_and_a_script_model_is_not(tmp_path):
    # the server's weights never change, so its switch skips the weights' check (model.freeze)
    lm = LoadedModel.load(Settings(model_dir=save_tiny(tmp_path), backend="torch"), Metrics())
    assert lm.model.frozen
    assert not dymu.load(tmp_path / "tiny").frozen


# ----------------------------------------------------------------------- GET /v1/cost-map
def test_cost_map_gives_what_post_preference_gives_at_every_point(client):
    cmap = client.cost_map(c=0.3, resolution=5)
    assert cmap.n_points == len(cmap.points) == 21
    assert (cmap.c, cmap.resolution, cmap.tasks, cmap.subset) == (0.3, 5, list(TASKS), list(TASKS))
    for point in cmap.points:
        record = client.create_preference(point.r, c=0.3)
        assert record.r == point.r  # the grid point is the canonical preference
        assert point.architecture_id == record.architecture.id
        assert point.flops == record.cost.flops and point.params == record.cost.params
        assert point.fraction_of_anchor_flops == pytest.approx(record.cost.fraction_of_anchor_flops)
        assert point.n_used_nodes == record.architecture.n_used_nodes
    assert cmap.n_architectures == len({p.architecture_id for p in cmap.points}) > 1
    assert cmap.min_gflops == min(p.gflops for p in cmap.points)
    assert cmap.max_gflops == max(p.gflops for p in cmap.points)
    assert cmap.anchor_flops == client.model().anchor_cost.flops


def test_cost_map_of_a_task_subset_counts_only_its_paths(client, model):
    cmap = client.cost_map(c=1.0, resolution=4, tasks=["depth", "normals"])
    assert cmap.subset == ["depth", "normals"] and cmap.tasks == list(TASKS)
    for point in cmap.points:
        arch = model.architecture(point.r, 1.0)
        assert point.architecture_id == arch.id
        assert point.flops == model.cost(arch, None, ["depth", "normals"]).flops
        assert point.n_used_nodes == arch.num_used_nodes([1, 2])
    full = client.cost_map(c=1.0, resolution=4)
    assert all(s.flops < f.flops for s, f in zip(cmap.points, full.points))


def test_cost_map_moves_with_c_as_the_controller_does(client, model):
    """The map at c = 0 and c = 1 differs exactly where the edge hypernet's tree does."""
    maps = {c: client.cost_map(c=c, resolution=8) for c in (0.0, 1.0)}
    changed = 0
    for p0, p1 in zip(maps[0.0].points, maps[1.0].points):
        assert p0.r == p1.r
        same_tree = model.architecture(p0.r, 0.0) == model.architecture(p1.r, 1.0)
        assert (p0.architecture_id == p1.architecture_id) == same_tree
        changed += not same_tree
    assert changed > 0


@pytest.mark.parametrize(
    ("params", "status", "error", "reason"),
    [
        ({"c": 1.5}, 422, "preference_error", "c must be in [0, 1]"),
        ({"c": "nan"}, 422, "preference_error", "finite"),
        ({"c": "x"}, 422, "validation_error", "query.c"),
        ({"resolution": 0}, 422, "validation_error", "query.resolution"),
        ({"resolution": 101}, 422, "validation_error", "query.resolution"),
        ({"tasks": "depth,nope"}, 422, "task_error", "unknown task"),
        ({"tasks": "depth,depth"}, 422, "task_error", "duplicate"),
    ],
)
def test_cost_map_bad_input_is_a_4xx_with_the_reason(server, params, status, error, reason):
    response = httpx.get(f"{server.url}/v1/cost-map", params=params)
    assert response.status_code == status
    body = response.json()
    assert body["error"] == error and reason in body["detail"]


# -------------------------------------------------------------------------- the page files
def test_page_and_its_files_are_served_from_the_package(server):
    for path in ("/", "/explorer"):
        page = httpx.get(server.url + path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert '<script type="module" src="/explorer/static/explorer.js">' in page.text
    for name, media in (("explorer.js", "javascript"), ("explorer.css", "text/css")):
        asset = httpx.get(f"{server.url}/explorer/static/{name}")
        assert asset.status_code == 200 and media in asset.headers["content-type"]
        text = asset.text.replace("http://www.w3.org/2000/svg", "")  # a namespace, not a fetch
        assert "http://" not in text and "https://" not in text  # nothing from elsewhere
    sample = httpx.get(server.url + "/explorer/example.png")
    assert sample.status_code == 200 and sample.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert httpx.get(server.url + "/explorer/static/missing.js").status_code == 404
    # shipped as package data, so that a non-editable install serves the page too
    files = resources.files("service") / "static"
    assert {f.name for f in files.iterdir()} >= {"index.html", "explorer.js", "explorer.css"}
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "static/*" in data["tool"]["setuptools"]["package-data"]["service"]


def test_openapi_lists_the_cost_map_but_not_the_page(client, server):
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert "/v1/cost-map" in paths and "/" not in paths and "/explorer" not in paths
    params = {p["name"] for p in paths["/v1/cost-map"]["get"]["parameters"]}
    assert params == {"c", "resolution", "tasks"}
