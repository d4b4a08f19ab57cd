"""The preference cache: an LRU bounded in entries and in bytes, with single-flight creation.

* A lookup that finds the key moves it to the front (hit).
* A lookup of a key being computed joins that computation: concurrent requests for the same new
  preference compute it once; only the request that started it counts as a miss.
* Insertion evicts least-recently-used entries until both bounds hold again (the newest entry
  and pinned entries, such as the default preference, are never evicted). Eviction only drops
  the cache's reference: a request that already holds an entry keeps it alive until it is done.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, Protocol, TypeVar

from .metrics import Metrics


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


E = TypeVar("E", bound=Sized)


class PreferenceCache(Generic[E]):
    def __init__(self, max_entries: int, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._entries: OrderedDict[Hashable, E] = OrderedDict()
        self._pinned: set[Hashable] = set()
        self._inflight: dict[Hashable, asyncio.Task] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    # -- plain LRU ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def peek(self, key: Hashable) -> E | None:
        """The entry without touching recency or counters."""
        return self._entries.get(key)

    def get(self, key: Hashable) -> E | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: E, pin: bool = False) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            if pin:
                self._pinned.add(key)
        self.enforce(keep=key)

    def enforce(self, keep: Hashable | None = None) -> list[Hashable]:
        """Evict LRU entries until both bounds hold; returns the evicted keys."""
        evicted = []
        with self._lock:
            total = sum(e.nbytes for e in self._entries.values())
            for key in list(self._entries):
                if len(self._entries) <= self.max_entries and total <= self.max_bytes:
                    break
                if key in self._pinned or key == keep:
                    continue
                total -= self._entries.pop(key).nbytes
                evicted.append(key)
            self.evictions += len(evicted)
        self._publish(evictions=len(evicted))
        return evicted

    def discard(self, key: Hashable) -> bool:
        """Drop ``key`` unless it is pinned (an outer LRU, e.g. Ray Serve's multiplexing, evicted
        it); whether it was dropped."""
        with self._lock:
            dropped = key not in self._pinned and self._entries.pop(key, None) is not None
        if dropped:
            self._publish()
        return dropped

    def clear(self) -> int:
        """Drop every entry except pinned ones; returns how many were dropped."""
        with self._lock:
            dropped = [k for k in self._entries if k not in self._pinned]
            for k in dropped:
                del self._entries[k]
        self._publish()
        return len(dropped)

    def _publish(self, evictions: int = 0) -> None:
        if self._metrics is None:
            return
        if evictions:
            self._metrics.cache_evictions.inc(evictions)
        self._metrics.cache_entries.set(len(self._entries))
        self._metrics.cache_bytes.set(self.nbytes)

    # -- single flight --------------------------------------------------------------------------
    async def get_or_create(
        self, key: Hashable, create: Callable[[], Awaitable[E]], pin: bool = False
    ) -> tuple[E, bool]:
        """``(entry, computed_here)``; ``create`` runs at most once per key at a time."""
        entry = self.get(key)
        if entry is not None:
            self._hit()
            return entry, False
        task = self._inflight.get(key)
        if task is not None:
            self._hit()
            return await asyncio.shield(task), False
        self.misses += 1
        if self._metrics is not None:
            self._metrics.cache_misses.inc()

        async def run() -> E:
            try:
                made = await create()
                self.put(key, made, pin=pin)
                return made
            finally:
                self._inflight.pop(key, None)

        task = asyncio.ensure_future(run())
        # Joiners may all go away; never leave an exception unretrieved.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._inflight[key] = task
        return await asyncio.shield(task), True

    def _hit(self) -> None:
        self.hits += 1
        if self._metrics is not None:
            self._metrics.cache_hits.inc()
