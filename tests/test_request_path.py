"""The request path's own machinery, without a model: where ``Service.io`` runs a step, how the
batcher hands out results and errors, and the cache of decoded preference ids
(docs/service.md, "Where the time goes")."""

from __future__ import annotations

import asyncio
import base64
import io
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from benchmarks.lean_http import closed_loop, oip_call
from service import imaging
from service.batching import Batcher
from service.client import DymuClient
from service.errors import BadImageError, MalformedPreferenceIdError, UnknownPreferenceIdError
from service.imaging import declared_pixels
from service.prefid import PreferenceIds
from service.settings import Settings
from service.state import Service, gil_switch_interval, restore_switch_interval

from .test_service import HW, png, random_image, running, save_tiny

TASKS = ("segmentation", "depth", "normals")


def thread_of_step(
    inline_io_bytes: int,
    data_bytes: int | None,
    in_flight: int = 2,
    side_by_side: bool = False,
    idle_inline_bytes: int = 1_048_576,
) -> str:
    """The thread a request step runs on (``in_flight``: predictions admitted, this one too)."""

    async def main() -> str:
        settings = Settings(inline_io_bytes=inline_io_bytes, idle_inline_bytes=idle_inline_bytes)
        svc = Service(settings)
        svc.in_flight = in_flight
        svc._io = ThreadPoolExecutor(1, thread_name_prefix="dymu-io")  # what start() makes
        try:
            name = threading.current_thread
            return await svc.io(
                lambda: name().name, data_bytes=data_bytes, side_by_side=side_by_side
            )
        finally:
            svc._io.shutdown()

    return asyncio.run(main())


def test_a_small_images_step_runs_on_the_loop_and_a_large_ones_on_an_io_thread():
    loop_thread = threading.current_thread().name
    assert thread_of_step(65_536, 36_864) == loop_thread  # 96x128x3: the hop costs more
    assert thread_of_step(65_536, 65_536) == loop_thread
    assert thread_of_step(65_536, 65_537).startswith("dymu-io")
    assert thread_of_step(65_536, 331_776).startswith("dymu-io")  # 288x384x3
    assert thread_of_step(65_536, None).startswith("dymu-io")  # size unknown: hop


def test_inline_io_bytes_zero_always_hops():
    assert thread_of_step(0, 1).startswith("dymu-io")


def test_a_lone_requests_step_stays_on_the_loop_up_to_idle_inline_bytes():
    loop_thread = threading.current_thread().name
    assert thread_of_step(65_536, 331_776, in_flight=1) == loop_thread  # alone: no hop
    assert thread_of_step(65_536, 1_048_576, in_flight=1) == loop_thread
    assert thread_of_step(65_536, 1_048_577, in_flight=1).startswith("dymu-io")  # too large
    assert thread_of_step(65_536, None, in_flight=1).startswith("dymu-io")  # size unknown
    # encodings gathered side by side hop, to run in parallel; so does a busy server's step
    assert thread_of_step(65_536, 331_776, in_flight=1, side_by_side=True).startswith("dymu-io")
    assert thread_of_step(65_536, 36_864, in_flight=1, side_by_side=True) == loop_thread
    assert thread_of_step(65_536, 331_776, in_flight=2).startswith("dymu-io")
    assert thread_of_step(65_536, 331_776, in_flight=1, idle_inline_bytes=0).startswith("dymu-io")


def run_batches(fn, payloads: list, max_batch: int = 4) -> list:
    """Submit ``payloads`` to a batcher over ``fn``; each job's result or exception."""

    async def main() -> list:
        with ThreadPoolExecutor(1) as ex:
            b = Batcher(fn, ex, workers=1, max_batch=max_batch, max_wait_s=0.01, max_queue=64)
            b.start()
            jobs = [b.submit("k", p) for p in payloads]
            out = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
            later = b.submit("k", "after")  # the worker is free again after an error
            out.append(await asyncio.wait_for(later.future, 5))
            await b.stop()
            return out

    return asyncio.run(main())


def test_the_batcher_hands_each_job_its_own_result():
    seen: list[list[str]] = []

    def fn(batch: list[str]) -> list[str]:
        seen.append(list(batch))
        return [p.upper() for p in batch]

    out = run_batches(fn, ["a", "b", "c", "d", "e"])
    assert out == ["A", "B", "C", "D", "E", "AFTER"]
    assert seen[0] == ["a", "b", "c", "d"]  # one batch of max_batch, then the rest


def test_a_failing_batch_fails_each_of_its_jobs_and_frees_the_worker():
    def fn(batch: list[str]) -> list[str]:
        if "bad" in batch:
            raise ValueError("the model failed")
        return batch

    out = run_batches(fn, ["x", "bad"], max_batch=2)
    assert [type(o) for o in out[:2]] == [ValueError, ValueError]
    assert out[2] == "after"


def inline_runs(steps: list[tuple[str, float]], *, seconds: float = 0.0, fail: bool = False):
    """Submit one job per ``(key, inline_s)`` step, each after the previous finished: the thread
    each ran on (``seconds``: how long ``fn`` takes)."""

    def fn(batch: list[str]) -> list[str]:
        time.sleep(seconds)
        if fail:
            raise ValueError("the model failed")
        return [threading.current_thread().name for _ in batch]

    async def main() -> list:
        with ThreadPoolExecutor(1, thread_name_prefix="worker") as ex:
            b = Batcher(fn, ex, workers=1, max_batch=4, max_wait_s=0.0, max_queue=64)
            b.start()
            out = []
            for key, inline_s in steps:
                job = b.submit(key, "x", None, inline_s)
                done_at_once = job.future.done()
                try:
                    out.append((await job.future, done_at_once))
                except ValueError as exc:
                    out.append((exc, done_at_once))
            await b.stop()
            return out

    return asyncio.run(main())


def test_a_lone_quick_image_runs_on_the_loop_once_its_key_has_been_timed():
    loop_thread = threading.current_thread().name
    ran = inline_runs([("a", 0.5), ("a", 0.5), ("b", 0.5), ("a", 0.0), ("a", 0.5)])
    assert [done for _, done in ran] == [False, True, False, False, True]
    assert ran[0][0] == "worker_0"  # never timed: the worker thread, which times it
    assert ran[1][0] == loop_thread  # timed quick: at once, on the calling thread
    assert ran[2][0] == "worker_0"  # another key: not timed yet
    assert ran[3][0] == "worker_0"  # inline_s 0: never on the loop
    assert ran[4][0] == loop_thread


def test_an_image_slower_than_the_bound_stays_on_the_worker():
    ran = inline_runs([("a", 0.02), ("a", 0.02), ("a", 0.02)], seconds=0.03)
    assert [(t, done) for t, done in ran] == [("worker_0", False)] * 3


def test_an_inline_failure_fails_its_job():
    ran = inline_runs([("a", 1.0), ("a", 1.0)], fail=True)
    assert [type(r) for r, _ in ran] == [ValueError, ValueError]
    assert [done for _, done in ran] == [False, True]


def test_a_busy_batcher_queues_even_a_quick_image():
    """While a batch runs on the worker, or images wait, nothing runs on the loop: the loop
    must keep feeding the worker."""
    release = threading.Event()

    def fn(batch: list[str]) -> list[str]:
        if "hold" in batch:
            release.wait(5)
        return [threading.current_thread().name for _ in batch]

    async def main() -> list[str]:
        with ThreadPoolExecutor(1, thread_name_prefix="worker") as ex:
            b = Batcher(fn, ex, workers=1, max_batch=1, max_wait_s=0.0, max_queue=64)
            b.start()
            await b.submit("a", "x", None, 1.0).future  # timed
            held = b.submit("h", "hold")
            while b.depth:  # the dispatcher hands it to the worker
                await asyncio.sleep(0.001)
            busy = b.submit("a", "x", None, 1.0)
            queued = b.submit("a", "x", None, 1.0)  # one image waits already, too
            assert not busy.future.done() and not queued.future.done()
            release.set()
            out = [await held.future, await busy.future, await queued.future]
            await b.stop()
            return out

    assert asyncio.run(main()) == ["worker_0"] * 3


def bound(svc: Service, images: int) -> float:
    return asyncio.run(svc.inline_model_s(images))


def test_inline_model_s_is_the_bound_only_for_a_lone_one_image_request():
    svc = Service(Settings(idle_inline_model_ms=10))
    svc.in_flight = 1
    assert bound(svc, 1) == pytest.approx(0.010)
    assert bound(svc, 2) == 0.0  # a request of two images: they batch together
    svc.in_flight = 2
    assert bound(svc, 1) == 0.0
    svc = Service(Settings(idle_inline_model_ms=0))
    svc.in_flight = 1
    assert bound(svc, 1) == 0.0
    # unset: a whole prediction may hold the loop with one inference worker, a quick one with
    # several (a request arriving meanwhile could run beside it)
    svc = Service(Settings())
    svc.in_flight = 1
    assert bound(svc, 1) == pytest.approx(0.050)
    svc = Service(Settings(inference_workers=2))
    svc.in_flight = 1
    assert bound(svc, 1) == pytest.approx(0.010)
    svc = Service(Settings(inference_workers=2, idle_inline_model_ms=30))
    svc.in_flight = 1
    assert bound(svc, 1) == pytest.approx(0.030)


@pytest.mark.parametrize("idle_inline_model_ms", [0.0, 10_000.0])
def test_a_lone_requests_model_runs_on_the_loop_from_its_second_request(
    tmp_path, monkeypatch, idle_inline_model_ms
):
    """On a real server, one client: the first prediction of a preference runs on an
    inference thread (and is timed), the next on the event loop, unless the bound is 0."""
    threads: list[str] = []
    run_batch = Service._run_batch

    def recording(self: Service, payloads: list) -> list:
        threads.append(threading.current_thread().name)
        return run_batch(self, payloads)

    monkeypatch.setattr(Service, "_run_batch", recording)
    settings = {"idle_inline_model_ms": idle_inline_model_ms, "max_batch_size": 4}
    image = random_image(1, HW)
    with running(save_tiny(tmp_path), **settings) as srv, DymuClient(srv.url) as c:
        first = c.predict(image, r=[0.6, 0.3, 0.1], c=0.5, format="npz")
        second = c.predict(image, r=[0.6, 0.3, 0.1], c=0.5, format="npz")
    for task, out in first.outputs.items():
        np.testing.assert_allclose(second.outputs[task], out, rtol=1e-5, atol=1e-6)
    infer = [t.startswith("dymu-infer") for t in threads[-2:]]
    assert infer == [True, idle_inline_model_ms == 0.0]
    if idle_inline_model_ms:
        assert second.metrics.queue_ms == 0.0  # no batch window


def test_a_burst_batches_though_its_group_would_run_inline(tmp_path):
    """Eight clients in a closed loop against a server whose inline bound covers any batch:
    requests that arrive together reach the gate before one of them may run on the loop, so
    the batcher sees them together (without that, each ran alone on the loop, batch 1)."""
    settings = {"idle_inline_model_ms": 10_000.0, "max_batch_size": 8, "max_wait_ms": 5.0}
    with running(save_tiny(tmp_path), **settings) as srv, DymuClient(srv.url) as c:
        info = c.model()
        call = oip_call(info.name, random_image(2, HW), info.default_preference_id)
        c.predict(random_image(2, HW))  # the group's first run, on a thread, timed
        load = asyncio.run(closed_loop("127.0.0.1", srv.port, call, clients=8, seconds=1.5))
    assert len(load.batches) > 20
    assert np.mean(load.batches) > 2.0, np.bincount(load.batches)


def test_a_running_server_shortens_the_switch_interval_and_restores_it(tmp_path):
    before = sys.getswitchinterval()
    with running(save_tiny(tmp_path), gil_switch_interval_ms=0.25) as server:
        assert sys.getswitchinterval() == pytest.approx(0.00025)
        with DymuClient(server.url) as client:  # and it serves
            assert client.predict(random_image(HW), r=[1, 0, 0]).outputs
    assert sys.getswitchinterval() == before


def test_a_switch_interval_of_zero_leaves_the_interpreters(tmp_path):
    before = sys.getswitchinterval()
    with running(save_tiny(tmp_path), gil_switch_interval_ms=0):
        assert sys.getswitchinterval() == before


def test_a_switch_interval_set_by_someone_else_meanwhile_is_left_alone():
    before = sys.getswitchinterval()
    saved = gil_switch_interval(0.3)
    try:
        sys.setswitchinterval(0.002)  # another party's choice, after the service's
        restore_switch_interval(saved)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


def test_the_switch_interval_comes_from_the_environment_and_is_not_negative(monkeypatch):
    assert Settings().gil_switch_interval_ms == 0.5
    monkeypatch.setenv("DYMU_GIL_SWITCH_INTERVAL_MS", "2")
    assert Settings().gil_switch_interval_ms == 2.0
    monkeypatch.setenv("DYMU_GIL_SWITCH_INTERVAL_MS", "-1")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Settings()


def test_decoded_ids_are_cached_but_an_altered_id_still_fails():
    ids = PreferenceIds.create(list(TASKS), "scenes-small", "v5")
    pid = ids.encode(ids.parse([0.6, 0.3, 0.1], 0.5)[1])
    assert ids.decode(pid) == ids.decode(pid)
    assert ids.decode(pid)[0].c == 0.5
    altered = pid[:-1] + ("0" if pid[-1] != "0" else "1")
    for _ in range(2):
        with pytest.raises(MalformedPreferenceIdError):
            ids.decode(altered)
    other = PreferenceIds.create(list(TASKS), "scenes-small", "v4")  # another version's id space
    with pytest.raises(UnknownPreferenceIdError):
        other.decode(pid)


def test_declared_pixels_reads_the_header_only():
    solid = io.BytesIO()
    Image.new("RGB", (1500, 1200), (10, 20, 30)).save(solid, format="PNG")
    assert len(solid.getvalue()) < 16_384  # a few KB that decode to 5.4 MB
    assert declared_pixels(solid.getvalue()) == 1500 * 1200
    assert declared_pixels(b"not an image") is None


def flat_png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, format="PNG")  # a few KB, w*h*3 of pixels
    return buf.getvalue()


@pytest.mark.parametrize("idle_inline_bytes", [0, 1_048_576])
def test_predict_decodes_a_small_image_on_the_loop_and_a_large_one_off_it(
    tmp_path, monkeypatch, idle_inline_bytes
):
    """On a real server: the choice follows the pixels the image declares, not its bytes; a
    lone request (one client, one request at a time) also decodes up to idle_inline_bytes on
    the loop."""
    import service.routers.predict as predict

    threads: list[str] = []
    decode = predict.decode_image

    def recording(data: bytes, max_pixels: int) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return decode(data, max_pixels)

    monkeypatch.setattr(predict, "decode_image", recording)
    small = png(random_image(0, HW))  # 24x32: 2.3 KB of pixels, on the loop
    images = (small, flat_png(640, 480), flat_png(1024, 768))  # 0.9 MB, 2.4 MB of pixels
    settings = {"inline_io_bytes": 65_536, "idle_inline_bytes": idle_inline_bytes}
    with running(save_tiny(tmp_path), **settings) as srv, DymuClient(srv.url) as c:
        for image in images:
            c.predict(image, format="npz")
    hopped = [t.startswith("dymu-io") for t in threads]
    assert hopped == [False, idle_inline_bytes == 0, True]


def test_an_infer_request_is_read_on_the_loop_only_when_its_inputs_are_raw_pixels():
    from service.routers.oip import raw_pixels_only

    assert raw_pixels_only({"inputs": [{"name": "image", "datatype": "UINT8"}]})
    assert not raw_pixels_only({"inputs": [{"name": "image", "datatype": "BYTES"}]})
    assert not raw_pixels_only({"inputs": [{"datatype": "UINT8"}, {"datatype": "BYTES"}]})
    assert not raw_pixels_only({"inputs": "image"}) and not raw_pixels_only({})


def _png_of(im: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "P-transparent"])
def test_libspng_decodes_an_8_bit_png_to_pillows_rgb(mode):
    rgb = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    if mode == "RGBA":
        im = Image.fromarray(np.dstack([rgb, rgb[:, :, 0]]))
    elif mode.startswith("P"):
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=200)
    elif mode != "RGB":
        im = im.convert(mode)
    data = _png_of(im, **({"transparency": 3} if mode == "P-transparent" else {}))
    pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    fast = imaging._spng_rgb(data, pillow.shape[:2])
    assert fast is not None  # libspng took it
    np.testing.assert_array_equal(fast, pillow)
    np.testing.assert_array_equal(imaging.decode_image(data, 10**6), pillow)


def test_pngs_of_other_depths_and_broken_ones_go_to_pillow():
    grey = np.random.default_rng(4).integers(0, 256, (20, 30), dtype=np.uint8)
    four_bit = _png_of(Image.fromarray(grey).convert("P", colors=16), bits=4)
    sixteen = _png_of(Image.fromarray(grey.astype(np.uint16) * 257))
    for data in (four_bit, sixteen):
        assert imaging._spng_rgb(data, (20, 30)) is None
        assert imaging.decode_image(data, 10**6).shape == (20, 30, 3)
    broken = _png_of(Image.fromarray(grey))[:-30]  # the IDAT cut short
    assert imaging._spng_rgb(broken, (20, 30)) is None
    with pytest.raises(BadImageError):
        imaging.decode_image(broken, 10**6)


@pytest.mark.parametrize("classes", [1, 2, 6, 300])
def test_the_class_map_is_argmax_over_classes_first_on_ties(classes):
    rng = np.random.default_rng(classes)
    logits = rng.standard_normal((classes, 17, 23)).astype(np.float32)
    logits[:, :4, :4] = 0.5  # every class ties there: the first wins
    labels = imaging.class_map(logits)
    assert labels.dtype == (np.uint8 if classes <= 256 else np.uint16)
    np.testing.assert_array_equal(labels, logits.argmax(axis=0))
    assert (labels[:4, :4] == 0).all()


def test_an_8_bit_png_is_decoded_once_by_libspng_and_not_by_pillow(monkeypatch):
    from PIL import ImageFile

    data = _png_of(Image.fromarray(np.full((30, 40, 3), 200, np.uint8)))
    loads: list[str] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        loads.append(self.format)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)  # PNG's and JPEG's
    assert (imaging.decode_image(data, 10**6) == 200).all()
    assert loads == []  # Pillow read only the header
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(jpeg, format="JPEG")
    imaging.decode_image(jpeg.getvalue(), 10**6)
    assert loads and set(loads) == {"JPEG"}  # a JPEG is Pillow's to decode


def test_the_json_png_reply_is_the_encoders_json_byte_for_byte():
    import json

    from service.routers.predict import json_bytes, prediction_json

    rng = np.random.default_rng(5)
    pngs = [base64.b64encode(rng.bytes(n)).decode() for n in (3, 3000, 30_000)]
    outputs = {
        "segmentation": {"kind": "segmentation", "shape": [4, 5], "png": pngs[0]},
        'dé"pth\\': {"kind": "depth", "scale": 0.5, "offset": -1.0, "png": pngs[1]},
        "normals": {"kind": "normals", "png": pngs[2], "note": '"png": "x"'},
        "label": {"kind": "classification", "label": 3, "probabilities": [0.25, 0.75]},
    }
    metrics = {"flops": 12, "tasks": list(outputs), "c": 0.5, "device": "cpu"}
    expected = json_bytes({"outputs": outputs, "metrics": metrics})
    assert prediction_json(outputs, metrics) == expected
    assert json.loads(expected)["outputs"]["normals"]["png"] == pngs[2]
    # a "png" that is not ASCII text goes through the encoder (escaped), not spliced raw
    odd = {"x": {"png": "é"}}
    assert prediction_json(odd, {}) == json_bytes({"outputs": odd, "metrics": {}})
