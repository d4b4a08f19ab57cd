"""The dymu service on Ray Serve: K replicas of the same app behind one HTTP endpoint.

Two deployments (``pip install 'dymu[ray]'``; docs/scale.md):

* :class:`DymuReplica` (K replicas) runs the *same* FastAPI app and model runtime as ``dymu
  serve`` (:func:`service.app.create_app`), called in-process through ``httpx.ASGITransport``:
  one implementation of the routes, errors, batching (the runtime's own :class:`Batcher`; Ray's
  ``@serve.batch`` is not used) and back-pressure (503 + Retry-After when its queue is full).
  Each preference's sub-network is a Ray Serve *multiplexed model* whose id is the preference id
  (service/prefid.py): ``@serve.multiplexed`` keeps at most ``cache_max_entries`` of them per
  replica (LRU) and tells Ray's router which replica holds which, so a request for a preference
  goes to a replica that has its sub-network cached.
* :class:`DymuIngress` (one replica, no CPU reserved) takes the plain HTTP request, derives the
  preference id from it with the service's own parsing and validation (the id needs only the
  manifest, not the weights), and forwards the request to the replicas' handle with
  ``.options(multiplexed_model_id=id)``. Plain HTTP clients need to know nothing of Ray; a
  request whose id cannot be derived (bad input) is forwarded without one and the replica's app
  answers it with its usual 4xx.

Responses carry ``X-Dymu-Replica`` (which replica served it) and ``X-Dymu-Cache`` (``hit`` when
that replica already held the sub-network). A replica that dies while serving a request makes
that request fail fast with 503 ``replica_failed`` and a reason; Ray starts a new replica and
the router sends later requests to live ones.

``dymu serve --engine ray --replicas K`` runs it on a local Ray (or ``RAY_ADDRESS``);
``serve run service.ray_app:app_builder replicas=2 model_dir=...`` and the KubeRay manifest in
docker/ deploy the same application.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from dymu.store import read_manifest, resolve

from . import errors, oip_codec
from .app import create_app
from .errors import OverloadedError, ReplicaFailedError, RequestTimeoutError, ServiceError
from .parsing import (
    check_declared_length,
    loads,
    parse_predict,
    read_limited,
    replayed,
    validated,
)
from .prefid import PreferenceIds
from .schemas import CACHE_HEADER, HEADER_PREFIX, PreferenceIn
from .settings import Settings

log = logging.getLogger("dymu.service")

REPLICA_HEADER = HEADER_PREFIX + "Replica"
# Not forwarded between the ingress and a replica: they describe one hop, not the request.
_HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


# ------------------------------------------------------------------------------- replicas
class SubNetwork:
    """One preference's cached entry in one replica: the object Ray's multiplexer holds.

    When Ray's per-replica LRU unloads it, :meth:`__del__` drops the entry from the runtime's
    preference cache too, so the replica holds what Ray's router believes it holds.
    """

    def __init__(self, cache: Any, key: Any, entry: Any) -> None:
        self.cache, self.key, self.entry = cache, key, entry
        self.uses = 0

    def __del__(self) -> None:  # Ray calls it on unload, Python again on collection: idempotent
        cache, self.cache = getattr(self, "cache", None), None
        if cache is not None:
            cache.discard(self.key)


class DymuReplica:
    """One replica: the service's FastAPI app, its model runtime, and the multiplexed cache."""

    async def __init__(self, settings: Settings) -> None:
        # Ray's multiplexed LRU is the binding bound on entries; the runtime cache gets one more
        # slot for its pinned default preference, so that it never evicts first.
        app_settings = settings.model_copy(
            update={"cache_max_entries": settings.cache_max_entries + 1}
        )
        self.app = create_app(app_settings)
        self.service = self.app.state.service
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        await self._until_loaded()
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://replica", timeout=None
        )
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        async def sub_network(preference_id: str) -> SubNetwork:
            lm = self.service.require_ready()
            pref, key = lm.decode_id(preference_id)
            entry, _ = await self.service.entry(lm, key, pref)
            return SubNetwork(lm.cache, key, entry)

        # Wired at init (Ray supports it) so that the LRU size comes from the settings.
        self.sub_network = serve.multiplexed(max_num_models_per_replica=settings.cache_max_entries)(
            sub_network
        )

    async def _until_loaded(self) -> None:
        """A replica takes traffic only once its model is verified and warmed up."""
        while self.service.status not in ("ready", "failed"):
            await asyncio.sleep(0.05)
        if self.service.status == "failed":
            raise RuntimeError(self.service.detail)

    async def check_health(self) -> None:
        if self.service.status == "failed":
            raise RuntimeError(f"dymu replica unhealthy: {self.service.detail}")

    async def forward(
        self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Run one HTTP request through the app; (status, headers, body) of its response."""
        cache = None
        preference_id = serve.get_multiplexed_model_id()
        if preference_id:
            with contextlib.suppress(Exception):  # not ready, bad id: the app answers that
                sub = await self.sub_network(preference_id)
                cache = "hit" if sub.uses else "miss"
                sub.uses += 1
        url = path + (f"?{query}" if query else "")
        response = await self.client.request(method, url, headers=headers, content=body)
        out = [(k, v) for k, v in response.headers.multi_items() if k not in _HOP_HEADERS]
        out = [(k, v) for k, v in out if k.lower() != CACHE_HEADER.lower() or cache is None]
        out.append((REPLICA_HEADER, self.replica_id))
        if cache is not None:
            out.append((CACHE_HEADER, cache))
        return response.status_code, out, response.content


# --------------------------------------------------------------------------------- ingress
class DymuIngress:
    """The HTTP entry point: derive the preference id, forward to a replica that holds it."""

    def __init__(self, replicas: DeploymentHandle, settings: Settings) -> None:
        self.replicas = replicas
        self.settings = settings
        self.ids = PreferenceIds.from_manifest(
            read_manifest(settings.model_dir, verify=False), settings.default_r, settings.default_c
        )

    async def __call__(self, request: Request) -> Response:
        s = self.settings
        try:
            body = await self._body(request)
        except ServiceError as exc:  # too large, or a Content-Length that is not a number
            return errors.error_response(exc)
        pref_id = await self.preference_id(request, body)
        handle = self.replicas.options(multiplexed_model_id=pref_id) if pref_id else self.replicas
        headers = [(k, v) for k, v in request.headers.items() if k not in _HOP_HEADERS]
        call = handle.forward.remote(
            request.method, request.url.path, request.url.query, headers, body
        )
        try:
            status, out, content = await asyncio.wait_for(call, s.request_timeout_s + 5)
        except BackPressureError:
            return errors.error_response(
                OverloadedError(
                    "every replica's queue is full; retry later",
                    headers={"Retry-After": str(s.retry_after_s)},
                )
            )
        except TimeoutError:
            call.cancel()
            return errors.error_response(
                RequestTimeoutError(f"no replica answered within {s.request_timeout_s + 5:g} s")
            )
        except Exception as exc:  # the replica died (ray.kill, OOM, node loss) or was cancelled
            text = str(exc).strip()
            reason = text.splitlines()[0][:200] if text else type(exc).__name__
            return errors.error_response(
                ReplicaFailedError(
                    f"the replica serving this request failed ({reason}); retry: the others "
                    "(and its replacement) keep serving",
                    headers={"Retry-After": str(s.retry_after_s)},
                )
            )
        response = Response(content, status)
        for k, v in out:
            response.headers.append(k, v)
        return response

    async def _body(self, request: Request) -> bytes:
        """The body, up to ``max_body_bytes`` (413 beyond, as the app's own gate answers)."""
        limit = self.settings.max_body_bytes
        check_declared_length(request.headers.get("content-length"), limit)
        return await read_limited(request.stream(), limit)

    async def preference_id(self, request: Request, body: bytes) -> str | None:
        """The id of the preference a request needs (None: none, or not derivable: the replica
        then answers the request, and its error, without routing by preference)."""
        method, path = request.method, request.url.path
        try:
            if method == "POST" and path == "/predict":
                fields = (await parse_predict(replayed(request, body))).fields
                if fields.budget is not None:  # the c a budget chooses needs the weights
                    return None
                _, key = self.ids.select(fields.preference_id, fields.r, fields.c)
            elif method == "POST" and path == "/preference":
                pref = validated(PreferenceIn, loads(body))
                if pref.budget is not None:
                    return None
                _, key = self.ids.parse(pref.r, pref.c)
            elif method == "POST" and oip_codec.INFER_PATH.match(path):  # Open Inference Protocol
                pid, r, c = oip_codec.preference_fields(
                    body, request.headers.get("inference-header-content-length")
                )
                _, key = self.ids.select(pid, r, c)
            elif method == "GET" and path.startswith("/preference/"):
                _, key = self.ids.decode(path.removeprefix("/preference/"))
            else:
                return None
        except Exception:
            return None
        return self.ids.encode(key)


# ----------------------------------------------------------------------------- application
def build_app(settings: Settings, replicas: int = 1, replica_cpus: float = 1.0) -> Any:
    """The Ray Serve application: ``replicas`` x :class:`DymuReplica` behind a
    :class:`DymuIngress`. The model version is resolved once here, so every replica (and every
    restarted one) serves the same version the ingress derives ids for."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    pinned = settings.model_copy(update={"model_dir": resolve(settings.model_dir)})
    replica = serve.deployment(
        DymuReplica,
        name="DymuReplica",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        # Enough concurrency per replica for the runtime's batcher to form batches and to
        # answer 503 itself when its queue is full; beyond that Ray's router queue (also
        # bounded) raises BackPressureError, which the ingress turns into 503.
        max_ongoing_requests=settings.max_queue + settings.max_batch_size,
        max_queued_requests=settings.max_queue,
        health_check_period_s=2,
        health_check_timeout_s=30,
    )
    ingress = serve.deployment(
        DymuIngress,
        name="DymuIngress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=replicas * (2 * settings.max_queue + settings.max_batch_size),
    )
    return ingress.bind(replica.bind(pinned), pinned)


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run service.ray_app:app_builder replicas=2 model_dir=...`` and KubeRay's
    ``import_path``: ``replicas`` and ``replica_cpus``, any other key is a Settings field
    (DYMU_* environment variables fill the rest)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    replica_cpus = float(args.pop("replica_cpus", 1))
    return build_app(Settings(**args), replicas, replica_cpus)


def run(settings: Settings, replicas: int, address: str | None = None) -> None:
    """``dymu serve --engine ray``: start (or join) Ray, deploy, serve until interrupted."""
    import signal

    import ray

    def stop(signum: int, frame: Any) -> None:  # docker stop / Kubernetes send SIGTERM
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings, replicas), name="dymu", route_prefix="/", blocking=True)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
