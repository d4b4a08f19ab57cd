"""The explorer page end to end: Debian's headless Chromium, driven by Playwright, against a real
uvicorn server on loopback serving a tiny random model. One server and one browser per module;
each test opens a fresh page. Every expectation is checked against what the API itself answers
for the same preference, never against numbers written into the test.

Screenshots of every test (and of both viewport sizes) go to tmp/artifacts/explorer/.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dymu
from dymu.architecture import Architecture
from service.client import DymuClient
from service.server import BackgroundServer

from .browser import ARTIFACTS, Browser, Page, chromium, expect, missing_browser
from .conftest import randomize_, tiny_config
from .test_service import HW, TASKS, png, random_image, running, save_tiny

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "service" / "example.png"
expect.set_options(timeout=20_000)  # a shared 2-core machine: generous, never a timing claim


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    reason = missing_browser()
    if reason is not None:
        if os.environ.get("DYMU_SKIP_BROWSER_TESTS") == "1":
            pytest.skip(f"DYMU_SKIP_BROWSER_TESTS=1: {reason}")
        pytest.fail(reason, pytrace=False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[BackgroundServer]:
    store = save_tiny(tmp_path_factory.mktemp("explorer"))
    with running(store) as srv:
        yield srv


@pytest.fixture(scope="module")
def server4(tmp_path_factory) -> Iterator[BackgroundServer]:
    """A second tiny model with 4 tasks, the last a classification: no triangle for its r."""
    torch.manual_seed(1)
    model = randomize_(dymu.create_model(tiny_config(n_tasks=4, input_size=HW)), seed=1)
    store = tmp_path_factory.mktemp("explorer4") / "tiny4"
    dymu.save(model, store)
    with running(store) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server) -> Iterator[DymuClient]:
    with DymuClient(server.url, timeout=30) as client:
        yield client


def open_page(browser: Browser, server: BackgroundServer, width: int, height: int):
    """A fresh page on the explorer, loaded and showing its first preference; the lists collect
    requests that left the server and errors the page reported."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    foreign: list[str] = []
    errors: list[str] = []
    local = (server.url + "/", "data:", "blob:")
    page.on("request", lambda req: None if req.url.startswith(local) else foreign.append(req.url))
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))

    def console(msg) -> None:
        # a 4xx the page asked for on purpose shows as a failed resource; anything else counts
        if msg.type == "error" and "status of 4" not in msg.text:
            errors.append(f"console: {msg.text}")

    page.on("console", console)
    page.goto(server.url + "/explorer")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.get_by_test_id("pref-id")).to_have_text(re.compile(r"^v1_"))
    return context, page, foreign, errors


@pytest.fixture
def page(browser, server, request) -> Iterator[Page]:
    context, page, foreign, errors = open_page(browser, server, 1280, 800)
    yield page
    page.screenshot(path=ARTIFACTS / f"{request.node.name}.png", full_page=True)
    context.close()
    assert not foreign, f"the page fetched from elsewhere: {foreign}"
    assert not errors, errors


# ----------------------------------------------------------------------------------- helpers
def page_preference(page: Page) -> tuple[list[float], float]:
    """The (r, c) the page's controls hold now."""
    r = [float(v) for v in page.locator("#r-text").input_value().split(",")]
    return r, float(page.locator("#c-slider").input_value())


def set_r(page: Page, text: str) -> None:
    page.get_by_label("r as numbers").fill(text)
    page.get_by_label("r as numbers").press("Enter")


def tree_state(page: Page, root: str = "#tree"):
    nodes = page.locator(f"{root} g.node").evaluate_all(
        "els => els.map(e => [+e.dataset.layer, +e.dataset.stream, e.dataset.used === 'true',"
        " e.dataset.shared === 'true'])"
    )
    edges = page.locator(f"{root} path.edge").evaluate_all(
        "els => els.map(e => [e.dataset.from, e.dataset.to])"
    )
    used = {(l, j) for l, j, u, _ in nodes if u}
    shared = {(l, j) for l, j, _, s in nodes if s}
    pairs = {(tuple(map(int, a.split(","))), tuple(map(int, b.split(",")))) for a, b in edges}
    return used, shared, pairs


def expected_tree(record, tasks: list[int] | None = None):
    """Used nodes, shared nodes and edges of the API's tree, from dymu's Architecture."""
    a = record.architecture
    arch = Architecture.from_parents(a.parents, a.n_tasks, a.n_layers)
    layers = arch.used_nodes(tasks)
    used = {(l, j) for l, js in enumerate(layers) for j in js}
    shared = {(l, j) for l, j in used if arch.is_shared(l, j, tasks)}
    edges = {((l - 1, arch.parents[l - 1][j]), (l, j)) for l, j in used if l > 0}
    return used, shared, edges


def expect_shows(page: Page, record) -> None:
    """The page shows this record of the API: its id, tree, GFLOPs, params and cache state."""
    expect(page.get_by_test_id("pref-id")).to_have_text(record.preference_id)
    expect(page.get_by_test_id("arch-id")).to_have_text(record.architecture.id)
    cost = record.cost
    flops = page.get_by_test_id("stat-flops")
    assert int(flops.get_attribute("data-value")) == cost.flops
    assert f"{cost.flops:,} FLOPs" in flops.text_content()
    gflops = float(page.get_by_test_id("stat-gflops").text_content())
    assert gflops == pytest.approx(cost.gflops, rel=1e-3)
    assert int(page.get_by_test_id("stat-params").get_attribute("data-value")) == cost.params
    fraction = page.get_by_test_id("stat-fraction").text_content()
    assert f"{100 * cost.fraction_of_anchor_flops:.1f} %" in fraction
    nodes = f"{record.architecture.n_used_nodes} of {record.architecture.n_nodes}"
    assert page.get_by_test_id("stat-nodes").text_content() == nodes
    assert page.get_by_test_id("stat-cache").get_attribute("data-cached") in ("true", "false")
    assert "ms in the server" in page.get_by_test_id("stat-switch").text_content()
    assert tree_state(page) == expected_tree(record)


def png_pixels(encoded: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as img:
        return np.asarray(img)


# ------------------------------------------------------------------------------------- tests
def test_moving_the_point_shows_the_architecture_and_cost_the_api_returns(page, api):
    start = api.create_preference([1, 1, 1], 0.0)
    expect_shows(page, start)  # the page opens on the uniform preference
    svg = page.locator("#picker svg").bounding_box()
    handle = page.get_by_test_id("picker-handle").bounding_box()
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    # towards the bottom-left corner (depth), in the triangle's own 300 x 270 coordinates
    target = (svg["x"] + svg["width"] * 70 / 300, svg["y"] + svg["height"] * 220 / 270)
    page.mouse.move(*target, steps=6)
    page.mouse.up()
    r, c = page_preference(page)
    assert r[1] > 0.6 and r[1] > r[0] and r[1] > r[2]
    record = api.create_preference(r, c)
    expect_shows(page, record)
    assert record.preference_id != start.preference_id
    shown = page.get_by_test_id("stat-rc")
    assert [float(v) for v in shown.get_attribute("data-r")[1:-1].split(",")] == record.r
    expect(page.get_by_test_id("picker-handle")).to_have_attribute(
        "aria-valuetext", ", ".join(f"{t} {v:.2f}" for t, v in zip(TASKS, r))
    )
    # the cost map is the API's for this c, and its marker moved with the point
    cmap = api.cost_map(c=c, resolution=30)
    costmap = page.locator("#costmap")
    expect(costmap).to_have_attribute("data-points", str(cmap.n_points))
    assert float(costmap.get_attribute("data-min")) == pytest.approx(cmap.min_gflops)
    assert float(costmap.get_attribute("data-max")) == pytest.approx(cmap.max_gflops)
    assert int(costmap.get_attribute("data-trees")) == cmap.n_architectures


def test_frugal_c_shows_fewer_gflops(page, api):
    # a preference where the tiny model's controller really shares more at c = 1 (from the API)
    at = {c: api.cost_map(c=c, resolution=10).points for c in (0.0, 1.0)}
    gain, r = max((p0.flops - p1.flops, p0.r) for p0, p1 in zip(at[0.0], at[1.0]))
    assert gain > 0, "the test model has no preference where c = 1 runs fewer FLOPs"
    set_r(page, ", ".join(str(v) for v in r))
    spending = api.create_preference(r, 0.0)
    expect_shows(page, spending)
    c_slider = page.get_by_role("slider", name="Frugality c")
    c_slider.focus()
    c_slider.press("End")
    expect(page.locator("#c-value")).to_have_text("1.00")
    frugal = api.create_preference(r, 1.0)
    expect_shows(page, frugal)
    assert frugal.cost.flops < spending.cost.flops
    expect(page.locator("#costmap")).to_have_attribute("data-c", "1")
    shown = int(page.get_by_test_id("stat-flops").get_attribute("data-value"))
    assert shown == spending.cost.flops - gain


def test_keyboard_operates_the_point_and_the_sliders(page, api):
    handle = page.get_by_role("slider", name="preference point r")
    handle.focus()
    for key in ["ArrowLeft"] * 6 + ["ArrowDown"] * 4:
        handle.press(key)
    r, c = page_preference(page)
    assert r[1] > r[0] and r[1] > r[2]  # moved towards depth's corner
    expect_shows(page, api.create_preference(r, c))

    c_slider = page.get_by_role("slider", name="Frugality c")
    c_slider.focus()
    for _ in range(3):
        c_slider.press("ArrowRight")
    expect(page.locator("#c-value")).to_have_text("0.03")
    expect_shows(page, api.create_preference(r, 0.03))

    depth = page.get_by_role("slider", name="depth", exact=True)
    depth.focus()
    depth.press("End")  # depth = 1: the other weights go to 0, r stays on the simplex
    expect_shows(page, api.create_preference([0, 1, 0], 0.03))
    assert page_preference(page)[0] == [0.0, 1.0, 0.0]
    depth.press("ArrowLeft")  # 0.99: the 0.01 goes to the others (equally: both were 0)
    expect_shows(page, api.create_preference([0.005, 0.99, 0.005], 0.03))

    # every control has an accessible name, and Tab reaches the sliders
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('input, button, select, [tabindex]')]
            .filter(e => !(e.labels?.length || e.getAttribute('aria-label')
                           || e.getAttribute('aria-labelledby') || e.textContent.trim()))
            .map(e => e.outerHTML)"""
    )
    assert unnamed == []
    for task in TASKS:
        expect(page.get_by_role("slider", name=task, exact=True)).to_have_count(1)
        expect(page.get_by_role("checkbox", name=task, exact=True)).to_have_count(1)
    page.get_by_label("r as numbers").focus()
    page.keyboard.press("Tab")  # -> the "Set r" button
    page.keyboard.press("Tab")  # -> the c slider
    assert page.evaluate("document.activeElement.id") == "c-slider"


def test_bad_typed_r_shows_the_servers_reason(page):
    set_r(page, "1, -1, 0")
    expect(page.locator("#error")).to_contain_text("non-negative")
    expect(page.get_by_label("r as numbers")).to_have_attribute("aria-invalid", "true")
    set_r(page, "2, 1, 1")  # the server normalizes it; the page adopts its r
    expect(page.locator("#error")).to_be_hidden()
    expect(page.get_by_label("r as numbers")).to_have_value("0.5, 0.25, 0.25")


def test_an_uploaded_image_shows_every_tasks_map(page, api, tmp_path):
    rgb = random_image(7, (48, 64))
    path = tmp_path / "upload.png"
    path.write_bytes(png(rgb))
    page.get_by_label("Upload an image (PNG or JPEG)").set_input_files(path)
    page.get_by_role("button", name="Predict", exact=True).click()
    r, c = page_preference(page)
    record = api.create_preference(r, c)
    box = page.locator("#prediction")
    expect(box).to_have_attribute("data-preference-id", record.preference_id)
    expect(box).to_have_attribute("data-pending", "false")
    result = api.predict(rgb, preference_id=record.preference_id)
    for task in TASKS:
        canvas = page.get_by_test_id(f"map-{task}")
        expect(canvas).to_be_visible()
        assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("64", "48")
        expect(page.get_by_test_id(f"legend-{task}")).to_be_visible()
    # segmentation: the classes in the page's map and legend are those the API predicts
    seg = page.get_by_test_id("map-segmentation")
    classes = [int(k) for k in np.unique(result.outputs["segmentation"])]
    assert seg.get_attribute("data-classes") == ",".join(map(str, classes))
    legend = page.get_by_test_id("legend-segmentation").locator("[data-class]")
    assert sorted(int(k) for k in legend.evaluate_all("els => els.map(e => e.dataset.class)")) == (
        classes
    )
    # depth: the colour bar spans the API's depth range
    depth = page.get_by_test_id("map-depth")
    enc = result.encoded["depth"]
    assert float(depth.get_attribute("data-min")) == pytest.approx(enc["offset"])
    assert float(depth.get_attribute("data-max")) == pytest.approx(
        enc["offset"] + 65535 * enc["scale"]
    )
    assert float(depth.get_attribute("data-min")) == pytest.approx(
        float(result.outputs["depth"].min()), abs=1e-5
    )
    # normals: the page's pixels are the API's RGB PNG
    drawn = page.get_by_test_id("map-normals").evaluate(
        "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
    )
    drawn = np.array(drawn, dtype=np.int16).reshape(48, 64, 4)[:, :, :3]
    assert np.abs(drawn - png_pixels(result.encoded["normals"]["png"])).max() <= 1
    # the request's cost and time
    flops = page.get_by_test_id("pred-flops")
    assert int(flops.get_attribute("data-value")) == result.metrics.flops
    assert page.get_by_test_id("pred-tasks").text_content() == ", ".join(TASKS)
    assert page.get_by_test_id("pred-model-ms").text_content().endswith(" ms")
    expect(page.locator("#prediction figure[data-task=input] img")).to_be_visible()


def test_the_task_subset_runs_only_those_paths(page, api):
    page.get_by_role("checkbox", name="segmentation", exact=True).uncheck()
    page.get_by_role("button", name="Use the sample image").click()  # loads it and predicts
    box = page.locator("#prediction")
    expect(box).to_have_attribute("data-tasks", "depth,normals")
    expect(page.get_by_test_id("map-segmentation")).to_have_count(0)
    expect(page.get_by_test_id("map-depth")).to_be_visible()
    r, c = page_preference(page)
    record = api.create_preference(r, c)
    result = api.predict(SAMPLE, preference_id=record.preference_id, tasks=["depth", "normals"])
    assert int(page.get_by_test_id("pred-flops").get_attribute("data-value")) == (
        result.metrics.flops
    )
    full = api.predict(SAMPLE, preference_id=record.preference_id)
    assert result.metrics.flops < full.metrics.flops
    # the tree shows only the subset's paths; the cost map counts only them
    assert tree_state(page) == expected_tree(record, [1, 2])
    expect(page.locator("#costmap-caption")).to_contain_text("depth, normals")
    cmap = api.cost_map(c=c, resolution=30, tasks=["depth", "normals"])
    expect(page.locator("#costmap")).to_have_attribute("data-max", str(cmap.max_gflops))
    # the last task cannot be unchecked
    page.get_by_role("checkbox", name="depth", exact=True).uncheck()
    normals = page.get_by_role("checkbox", name="normals", exact=True)
    normals.click()  # refused: it stays checked
    expect(normals).to_be_checked()
    expect(page.locator("#error")).to_contain_text("at least one task")


def test_a_budget_chooses_c_as_the_api_does(page, api):
    set_r(page, "1, 1, 1")
    expect(page.get_by_test_id("stat-rc")).to_have_attribute("data-c", "0")
    r = [1 / 3] * 3
    costs = sorted({api.create_preference(r, c).cost.flops for c in (0, 0.25, 0.5, 0.75, 1)})
    gflops = costs[0] / 1e9  # the cheapest of those trees: some c > 0 may be needed
    want = api.create_preference(r, budget={"max_gflops": gflops})
    page.get_by_label("a budget instead of c").check()
    page.locator("#budget-gflops").fill(repr(gflops))
    chosen = page.get_by_test_id("budget-chosen")
    expect(chosen).to_have_attribute("data-c", repr(want.c).rstrip("0").rstrip(".") or "0")
    expect(chosen).to_have_attribute("data-flops", str(want.budget.cost.flops))
    expect(page.get_by_test_id("pref-id")).to_have_text(want.preference_id)
    expect(page.locator("#c-slider")).to_be_disabled()
    assert float(page.locator("#c-slider").input_value()) == pytest.approx(want.c, abs=0.01)
    assert want.budget.cost.flops <= gflops * 1e9
    # the task subset: the budget is for the tasks that run
    page.locator("#task-subset input[data-task='segmentation']").uncheck()
    sub = api.create_preference(r, budget={"max_gflops": gflops}, tasks=["depth", "normals"])
    expect(chosen).to_have_attribute("data-flops", str(sub.budget.cost.flops))
    # below the cheapest tree: the server's reason
    page.locator("#budget-gflops").fill("0.000001")
    expect(page.locator("#error")).to_contain_text("below the cheapest")
    page.get_by_label("a budget instead of c").uncheck()
    expect(page.locator("#c-slider")).to_be_enabled()


def test_compare_two_preferences_on_the_same_image(page, api):
    set_r(page, "1, 0, 0")
    a = api.create_preference([1, 0, 0], 0.0)
    expect(page.get_by_test_id("pref-id")).to_have_text(a.preference_id)
    page.get_by_role("button", name="Keep current as A").click()
    set_r(page, "0, 0, 1")
    c_slider = page.get_by_role("slider", name="Frugality c")
    c_slider.focus()
    c_slider.press("End")
    b = api.create_preference([0, 0, 1], 1.0)
    expect(page.get_by_test_id("pref-id")).to_have_text(b.preference_id)
    page.get_by_role("button", name="Keep current as B").click()
    page.get_by_role("button", name="Compare on the image").click()
    for slot, record in (("a", a), ("b", b)):
        col = page.locator(f"#compare-{slot}")
        expect(col).to_have_attribute("data-preference-id", record.preference_id)
        result = api.predict(SAMPLE, preference_id=record.preference_id)
        assert int(col.get_attribute("data-flops")) == result.metrics.flops
        for task in TASKS:
            expect(col.get_by_test_id(f"map-{task}")).to_be_visible()
        assert tree_state(page, f"#compare-{slot}") == expected_tree(record)
    expect(page.get_by_test_id("compare-note")).to_contain_text("FLOPs than A")


@pytest.mark.parametrize(("width", "height"), [(1280, 800), (390, 844)])
def test_layout_fits_the_viewport(browser, server, width, height):
    context, page, foreign, errors = open_page(browser, server, width, height)
    try:
        page.get_by_role("button", name="Use the sample image").click()
        for task in TASKS:
            expect(page.get_by_test_id(f"map-{task}")).to_be_visible()
        page.evaluate("window.scrollTo(0, 0)")
        overflow = page.evaluate(
            """() => {
                const w = document.documentElement.clientWidth;
                const out = [...document.querySelectorAll('body *')].filter(e => {
                    const r = e.getBoundingClientRect();
                    return r.width > 0 && (r.right > w + 0.5 || r.left < -0.5);
                }).map(e => `${e.tagName}#${e.id}.${e.className}`);
                return {scroll: document.documentElement.scrollWidth, width: w, out};
            }"""
        )
        assert overflow["scroll"] <= overflow["width"] == width, overflow
        assert overflow["out"] == [], overflow
        page.screenshot(path=ARTIFACTS / f"explorer-{width}x{height}.png")
        page.screenshot(path=ARTIFACTS / f"explorer-{width}x{height}-full.png", full_page=True)
    finally:
        context.close()
    assert not foreign and not errors, (foreign, errors)


def test_four_tasks_get_simplex_sliders_a_cost_histogram_and_a_label(browser, server4):
    context, page, foreign, errors = open_page(browser, server4, 1280, 800)
    try:
        with DymuClient(server4.url, timeout=30) as api:
            tasks = [t.name for t in api.model().tasks]
            assert tasks == [*TASKS, "label"]
            expect(page.locator("#picker")).to_be_hidden()  # sliders only beyond 3 tasks
            label = page.get_by_role("slider", name="label", exact=True)
            label.focus()
            label.press("End")
            for _ in range(10):
                label.press("ArrowLeft")  # 0.90; the other three share the 0.10
            r, c = page_preference(page)
            assert r[3] == 0.9 and sum(r) == pytest.approx(1.0, abs=1e-12) and min(r) > 0
            record = api.create_preference(r, c)
            expect_shows(page, record)
            # no 2-D simplex: a histogram over the grid the page asks for (<= 2,000 points)
            cmap = api.cost_map(c=c, resolution=20)
            expect(page.locator("#costmap")).to_have_attribute("data-points", str(cmap.n_points))
            page.get_by_role("button", name="Use the sample image").click()
            box = page.locator("#prediction")
            expect(box).to_have_attribute("data-preference-id", record.preference_id)
            result = api.predict(SAMPLE, preference_id=record.preference_id)
            label_out = result.encoded["label"]
            expect(page.get_by_test_id("map-label")).to_have_attribute(
                "data-label", str(label_out["label"])
            )
            for task in TASKS:
                expect(page.get_by_test_id(f"map-{task}")).to_be_visible()
            page.screenshot(path=ARTIFACTS / "explorer-4-tasks.png", full_page=True)
    finally:
        context.close()
    assert not foreign and not errors, (foreign, errors)
