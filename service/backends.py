"""Backends that run a materialized sub-network: eager torch and ONNX Runtime.

``torch``: the :class:`dymu.MaterializedModel` as it is (BN already folded), under
``inference_mode``; on CUDA in channels-last memory format under float16 autocast.

``onnx``: one ONNX graph per *tree* (architecture id + task subset), exported with the
weights as graph inputs (``export_params=False``), so every preference with the same tree
shares one ONNX Runtime session and feeds its own folded weights (held as ``OrtValue`` on the
session's device). Export and session creation run on a background thread when a tree is
first seen; until the session is ready, that tree's requests run on torch, and the response
says which backend ran.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from dymu.materialize import MaterializedModel, clone_module

from .metrics import Metrics

log = logging.getLogger("dymu.service")

INPUT_NAME = "image"
#: Eager torch on the CPU with channels-last tensors (oneDNN's preferred layout for convs).
CHANNELS_LAST = "torch-cl"
_PREFIX = "net."
#: Input shapes whose output shapes a session remembers (to write its outputs in place).
MAX_OUTPUT_SHAPES = 64


def _failed(fut: Future) -> bool:
    """A finished build that gave no session (an error, or cancelled at shutdown)."""
    return fut.done() and (fut.cancelled() or fut.exception() is not None)


def onnx_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_backend(name: str) -> str:
    """The backend to build runners for; ``auto`` starts on ONNX Runtime when installed and is
    settled by :func:`measure_backends` at warm-up."""
    if name == "auto":
        return "onnx" if onnx_available() else "torch"
    if name == "onnx" and not onnx_available():
        raise RuntimeError("backend 'onnx' needs onnxruntime: pip install 'dymu[onnx]'")
    return name


def module_nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class _TupleOut(nn.Module):
    """``x -> tuple of task outputs`` (ONNX graphs have positional outputs)."""

    def __init__(self, net: MaterializedModel) -> None:
        super().__init__()
        self.net = net
        self.task_names = net.tasks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(x)
        return tuple(out[t] for t in self.task_names)


def export_onnx(net: MaterializedModel, input_hw: tuple[int, int]) -> bytes:
    """The tree of ``net`` as ONNX, weights as inputs, dynamic batch/height/width.

    An unfolded tree keeps its BatchNormalization nodes (exported as they are): in eval mode
    the exporter would fuse each Conv+BN itself, into weights no module parameter can feed.
    """
    wrapper = _TupleOut(clone_module(net).cpu().float().eval())
    # PRESERVE exports the modules' own (eval) mode without the eval-only Conv+BN fusion
    mode = torch.onnx.TrainingMode.EVAL if net.bn_folded else torch.onnx.TrainingMode.PRESERVE
    example = torch.zeros(1, net.in_channels, *input_hw)
    buf = io.BytesIO()
    dyn = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    dyn.update({t: {0: "batch"} for t in net.tasks})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            buf,
            dynamo=False,
            export_params=False,
            input_names=[INPUT_NAME],
            output_names=list(net.tasks),
            dynamic_axes=dyn,
            opset_version=17,
            training=mode,
        )
    return buf.getvalue()


class OnnxSession:
    """An ONNX Runtime session for one tree, and the names of its weight inputs."""

    def __init__(self, data: bytes, device: torch.device, threads: int | None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # No busy-waiting between runs: the same process decodes and encodes images and runs
        # the event loop, and spinning ORT threads would take their cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        self.ort_device, self.device_id = "cpu", 0
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            self.device_id = device.index or 0
            providers = [("CUDAExecutionProvider", {"device_id": self.device_id}), *providers]
            self.ort_device = "cuda"
        self.session = ort.InferenceSession(data, opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.weight_names = [i.name for i in self.session.get_inputs() if i.name != INPUT_NAME]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.nbytes = len(data)
        # (input name, storage, version) -> (tensor, OrtValue): shared weights converted once
        self._shared: OrderedDict[tuple[str, int, int], tuple[torch.Tensor, Any]] = OrderedDict()
        self._max_shared = 2 * len(self.weight_names)
        self._lock = threading.Lock()
        # outputs written in place need their shapes before the run: learnt per input shape
        # from the first run (on the CPU, float outputs; elsewhere ONNX Runtime allocates)
        self._in_place = self.ort_device == "cpu" and all(
            o.type == "tensor(float)" for o in self.session.get_outputs()
        )
        self._out_shapes: dict[tuple[int, ...], list[tuple[int, ...]]] = {}

    def weights(self, net: MaterializedModel) -> Feed:
        """``net``'s folded parameters as this session's weight inputs, bound once (a
        :class:`Feed`).

        Preferences of one tree share every tensor but their adapted convolutions
        (:class:`dymu.materialize.Skeleton`), so the ``OrtValue`` of a shared tensor is made once
        per session and reused: a switch feeds only the weights that changed.
        """
        import onnxruntime as ort

        state = {_PREFIX + k: v for k, v in net.named_parameters()}
        state.update((_PREFIX + k, v) for k, v in net.named_buffers())
        missing = [n for n in self.weight_names if n not in state]
        if missing:
            raise RuntimeError(f"the ONNX graph needs weights the module lacks: {missing[:3]}")
        with self._lock:
            values = {n: self._ort_value(n, state[n], ort) for n in self.weight_names}
        return Feed(self.session, values)

    def _ort_value(self, name: str, t: torch.Tensor, ort: Any) -> Any:
        # LRU: the tree's shared tensors are hit by every preference and stay; a preference's
        # own tensors age out. An entry holds its tensor, so its storage (the key) stays its own.
        key = (name, t.data_ptr(), t._version)
        found = self._shared.get(key)
        if found is not None:
            self._shared.move_to_end(key)
            return found[1]
        arr = t.detach().float().cpu().contiguous().numpy()
        value = ort.OrtValue.ortvalue_from_numpy(arr, self.ort_device, self.device_id)
        self._shared[key] = (t, value)
        while len(self._shared) > self._max_shared:
            self._shared.popitem(last=False)
        return value

    def run(self, x: np.ndarray, feed: Feed) -> list[np.ndarray]:
        """The outputs of ``x`` (contiguous float32, NCHW) under ``feed``'s weights."""
        with feed.binding() as binding:
            binding.bind_cpu_input(INPUT_NAME, x)
            outs = self._bind_outputs(binding, x.shape)
            self.session.run_with_iobinding(binding)
            if outs is None:
                outs = binding.copy_outputs_to_cpu()
                if self._in_place:
                    self._remember_shapes(x.shape, [o.shape for o in outs])
        return outs

    def _bind_outputs(self, binding: Any, shape: tuple[int, ...]) -> list[np.ndarray] | None:
        """Fresh arrays bound as the outputs, which ONNX Runtime then writes in place (no copy
        of the outputs after the run), once the shapes for this input shape are known; else
        outputs ONNX Runtime allocates (None)."""
        shapes = self._out_shapes.get(shape) if self._in_place else None
        if shapes is None:
            for name in self.output_names:
                binding.bind_output(name, "cpu")
            return None
        outs = [np.empty(s, np.float32) for s in shapes]
        for name, out in zip(self.output_names, outs, strict=True):
            binding.bind_output(name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        return outs

    def _remember_shapes(self, shape: tuple[int, ...], shapes: list[tuple[int, ...]]) -> None:
        if len(self._out_shapes) >= MAX_OUTPUT_SHAPES:  # request sizes vary: keep it bounded
            self._out_shapes.clear()
        self._out_shapes[shape] = shapes


class Feed:
    """One preference's weights for one session: ``OrtValue`` inputs bound once into an ONNX
    Runtime ``IOBinding`` that every run reuses, so a run binds only its image and outputs
    (binding ~70-110 weights took 0.1 ms a run, docs/service.md, "Where the time goes"). A
    binding serves one run at a time: concurrent runs (several inference workers) take one
    each from a small pool."""

    def __init__(self, session: Any, values: dict[str, Any]) -> None:
        self.values = values
        self._session = session
        self._free = [self._bound()]
        self._lock = threading.Lock()

    def _bound(self) -> Any:
        binding = self._session.io_binding()
        for name, value in self.values.items():
            binding.bind_ortvalue_input(name, value)
        return binding

    @contextlib.contextmanager
    def binding(self) -> Iterator[Any]:
        """A binding with the weights in place, for one run."""
        with self._lock:
            binding = self._free.pop() if self._free else None
        if binding is None:
            binding = self._bound()
        try:
            yield binding
        finally:
            with self._lock:
                self._free.append(binding)


class OnnxPool:
    """Sessions keyed by tree (architecture id, task indices), built once, LRU-bounded."""

    def __init__(
        self,
        device: torch.device,
        input_hw: tuple[int, int],
        threads: int | None,
        max_sessions: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.device = device
        self.input_hw = input_hw
        self.threads = threads
        self.max_sessions = max_sessions
        self.metrics = metrics
        self._sessions: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dymu-onnx-export")

    def request(self, key: tuple, net: MaterializedModel) -> Future:
        """The (possibly still running) build of ``key``'s session; starts it if needed."""
        with self._lock:
            fut = self._sessions.get(key)
            if fut is not None and not _failed(fut):
                self._sessions.move_to_end(key)
                return fut
            fut = self._executor.submit(self._build, net)
            self._sessions[key] = fut
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            if self.metrics is not None:
                self.metrics.onnx_sessions.set(len(self._sessions))
        return fut

    def _build(self, net: MaterializedModel) -> OnnxSession:
        t0 = time.perf_counter()
        try:
            session = OnnxSession(export_onnx(net, self.input_hw), self.device, self.threads)
        except Exception:
            log.exception("ONNX export of tree %s failed; it stays on torch", net.architecture.id)
            raise
        if self.metrics is not None:
            self.metrics.onnx_export_seconds.observe(time.perf_counter() - t0)
        return session

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()
            if self.metrics is not None:
                self.metrics.onnx_sessions.set(0)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Runner:
    """Runs one preference's sub-network for one task subset, on the best backend ready."""

    def __init__(
        self,
        net: MaterializedModel,
        device: torch.device,
        backend: str,
        pool: OnnxPool | None,
    ) -> None:
        self.device = device
        if device.type == "cuda" or backend == CHANNELS_LAST:
            net = net.to(device=device, memory_format=torch.channels_last)
        self.net = net
        self.tasks = net.tasks
        self.backend = backend
        self.nbytes = module_nbytes(net)
        self._weights: Feed | None = None
        self._session: OnnxSession | None = None
        self._build: Future | None = None
        self._lock = threading.Lock()
        self.onnx_error: str | None = None
        if backend == "onnx" and pool is not None:
            key = (net.architecture.id, net.task_indices)
            self._build = pool.request(key, net)

    # -- state ----------------------------------------------------------------------------------
    @property
    def onnx_status(self) -> str:
        if self.backend != "onnx":
            return "disabled"
        if self._session is not None:
            return "ready"
        if self._build is None:
            return "unavailable"
        if not self._build.done():
            return "building"
        return "failed" if _failed(self._build) else "ready"

    def wait_onnx(self, timeout: float | None = None) -> bool:
        """Block until the ONNX session is ready (True) or failed (False)."""
        if self._build is None:
            return False
        try:
            self._build.result(timeout)
        except Exception:  # failed, cancelled or timed out: torch keeps serving
            return False
        return self._onnx() is not None

    def _onnx(self) -> tuple[OnnxSession, Feed] | None:
        if self._session is not None:
            return self._session, self._weights
        build = self._build
        if build is None or not build.done() or _failed(build):
            if build is not None and _failed(build) and self.onnx_error is None:
                self.onnx_error = "cancelled" if build.cancelled() else str(build.exception())
            return None
        with self._lock:
            if self._session is None:
                session = build.result()
                try:
                    self._weights = session.weights(self.net)
                except Exception as exc:
                    log.exception("cannot feed this preference's weights to its ONNX session")
                    self.onnx_error = str(exc)
                    self._build = None
                    return None
                self.nbytes = module_nbytes(self.net) * 2  # torch weights + ORT copies
                self._session = session
        return self._session, self._weights

    # -- inference ------------------------------------------------------------------------------
    def run(self, x: torch.Tensor) -> tuple[dict[str, np.ndarray], str, float]:
        """``x`` (B, C, H, W) float32 on the CPU -> (outputs as float32 arrays, backend, s)."""
        onnx = self._onnx() if self.backend == "onnx" else None
        if onnx is not None:
            session, weights = onnx
            arr = np.ascontiguousarray(x.numpy(), dtype=np.float32)
            t0 = time.perf_counter()
            outs = session.run(arr, weights)
            dt = time.perf_counter() - t0
            return dict(zip(self.tasks, outs)), "onnx", dt
        return self._run_torch(x)

    def _run_torch(self, x: torch.Tensor) -> tuple[dict[str, np.ndarray], str, float]:
        with torch.inference_mode():
            if self.device.type == "cuda":
                xd = x.to(self.device, non_blocking=True).contiguous(
                    memory_format=torch.channels_last
                )
                torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.float16):
                    out = self.net(xd)
                torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
            else:
                if self.backend == CHANNELS_LAST:
                    x = x.contiguous(memory_format=torch.channels_last)
                t0 = time.perf_counter()
                out = self.net(x)
                dt = time.perf_counter() - t0
            arrays = {k: v.float().cpu().numpy() for k, v in out.items()}
        return arrays, CHANNELS_LAST if self.backend == CHANNELS_LAST else "torch", dt


def measure_backends(
    net: MaterializedModel,
    x: torch.Tensor,
    device: torch.device,
    pool: OnnxPool | None,
    rounds: int = 5,
) -> dict[str, float]:
    """Median seconds of one batch ``x`` through ``net`` per candidate backend: eager torch,
    channels-last torch (CPU) and ONNX Runtime (when a pool is given). Candidates run on
    copies, so ``net`` is left as it is; runs alternate between candidates so that a burst of
    load on a shared machine hits them alike."""
    runners = {"torch": Runner(clone_module(net), device, "torch", None)}
    if device.type == "cpu":
        runners[CHANNELS_LAST] = Runner(clone_module(net), device, CHANNELS_LAST, None)
    if pool is not None:
        onnx = Runner(net, device, "onnx", pool)
        if onnx.wait_onnx(timeout=300):
            runners["onnx"] = onnx
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for runner in runners.values():
        runner.run(x)  # first run: allocation, oneDNN primitive creation
    for _ in range(rounds):
        for name, runner in runners.items():
            samples[name].append(runner.run(x)[2])
    return {name: float(np.median(ts)) for name, ts in samples.items()}
