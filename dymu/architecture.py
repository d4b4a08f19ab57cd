"""The tree-structured architecture: which parent each node reads (paper §3.2; docs/design.md §2).

Layers are 0-based in code: layer 0 reads the image, layer ``L-1`` feeds the heads.
``parents[b][j]`` is the stream whose layer-``b`` output node ``(b+1, j)`` reads, for
``b = 0 .. L-2`` (the paper's ``parents[l][j]`` for ``l = 2..L``). Head ``j`` reads node
``(L-1, j)``, so the top layer always has one node per requested task.
"""

from __future__ import annotations

import hashlib
import json
import random as _random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from .errors import ArchitectureError

Node = tuple[int, int]  # (layer, stream)


@dataclass(frozen=True)
class Architecture:
    """An immutable tree over an N-stream, L-layer anchor net.

    Build one with :meth:`from_parents`, :meth:`fully_shared`, :meth:`fully_branched`,
    :meth:`random` or :meth:`from_logits`; all validate.
    """

    n_tasks: int
    n_layers: int
    parents: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        n, layers = self.n_tasks, self.n_layers
        if not isinstance(n, int) or n < 1:
            raise ArchitectureError(f"n_tasks must be a positive int, got {n!r}")
        if not isinstance(layers, int) or layers < 1:
            raise ArchitectureError(f"n_layers must be a positive int, got {layers!r}")
        if len(self.parents) != layers - 1:
            raise ArchitectureError(
                f"parents needs {layers - 1} rows (one per layer boundary), got {len(self.parents)}"
            )
        for b, row in enumerate(self.parents):
            if len(row) != n:
                raise ArchitectureError(f"parents[{b}] needs {n} entries, got {len(row)}")
            for j, p in enumerate(row):
                if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n:
                    raise ArchitectureError(
                        f"parents[{b}][{j}] must be a stream index in [0, {n}), got {p!r}"
                    )

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_parents(
        cls,
        parents: Sequence[Sequence[int]],
        n_tasks: int | None = None,
        n_layers: int | None = None,
    ) -> Architecture:
        rows = tuple(
            tuple(int(p) if not isinstance(p, bool) else p for p in row) for row in parents
        )
        if n_tasks is None:
            if not rows:
                raise ArchitectureError("n_tasks is needed for a one-layer architecture")
            n_tasks = len(rows[0])
        return cls(
            n_tasks=n_tasks, n_layers=len(rows) + 1 if n_layers is None else n_layers, parents=rows
        )

    @classmethod
    def fully_branched(cls, n_tasks: int, n_layers: int) -> Architecture:
        """Every node reads its own stream: the N single-task networks (the anchor net)."""
        return cls(n_tasks, n_layers, tuple(tuple(range(n_tasks)) for _ in range(n_layers - 1)))

    @classmethod
    def fully_shared(cls, n_tasks: int, n_layers: int, stream: int = 0) -> Architecture:
        """All tasks share stream ``stream`` up to layer L-2; only the top layer branches."""
        return cls(n_tasks, n_layers, tuple((stream,) * n_tasks for _ in range(n_layers - 1)))

    @classmethod
    def random(cls, n_tasks: int, n_layers: int, seed: int | None = None) -> Architecture:
        rng = _random.Random(seed)
        return cls(
            n_tasks,
            n_layers,
            tuple(
                tuple(rng.randrange(n_tasks) for _ in range(n_tasks)) for _ in range(n_layers - 1)
            ),
        )

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> Architecture:
        """Arg-max parents of edge-hypernet logits of shape (L-1, N, N) (child x parent)."""
        if (
            not isinstance(logits, torch.Tensor)
            or logits.ndim != 3
            or (logits.shape[1] != logits.shape[2])
        ):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ArchitectureError(f"logits must be a tensor of shape (L-1, N, N), got {shape}")
        parents = logits.argmax(dim=-1).tolist()
        return cls(
            n_tasks=logits.shape[1],
            n_layers=logits.shape[0] + 1,
            parents=tuple(tuple(row) for row in parents),
        )

    # -- tree queries -------------------------------------------------------------------------
    def parent(self, layer: int, stream: int) -> int:
        """Stream of the node at ``layer - 1`` that node ``(layer, stream)`` reads (layer >= 1)."""
        return self.parents[layer - 1][stream]

    def ancestor(self, layer: int, stream: int) -> int:
        """Stream of the node at ``layer`` on the path from the image to head ``stream``."""
        j = stream
        for b in range(self.n_layers - 2, layer - 1, -1):
            j = self.parents[b][j]
        return j

    def used_nodes(self, tasks: Iterable[int] | None = None) -> tuple[tuple[int, ...], ...]:
        """Streams that run, per layer: ``U_{L-1}`` = tasks, ``U_{l-1}`` = parents of ``U_l``.

        Returns one sorted tuple of stream indices per layer (layer 0 first).
        """
        top = sorted(set(range(self.n_tasks) if tasks is None else tasks))
        if not top or not all(0 <= t < self.n_tasks for t in top):
            raise ArchitectureError(f"tasks must be a non-empty subset of range({self.n_tasks})")
        used = [tuple(top)]
        for b in range(self.n_layers - 2, -1, -1):
            used.append(tuple(sorted({self.parents[b][j] for j in used[-1]})))
        return tuple(reversed(used))

    def node_list(self, tasks: Iterable[int] | None = None) -> list[Node]:
        """The used nodes as ``(layer, stream)`` pairs, in topological order."""
        return [(l, j) for l, streams in enumerate(self.used_nodes(tasks)) for j in streams]

    def one_hot_nu(self, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """The tree as L-1 one-hot (N, N) parent distributions, the ``nu`` of the soft forward."""
        eye = torch.eye(self.n_tasks, device=device)
        return [eye[list(row)] for row in self.parents]

    def num_used_nodes(self, tasks: Iterable[int] | None = None) -> int:
        return sum(len(u) for u in self.used_nodes(tasks))

    def readers(self, layer: int, stream: int) -> tuple[int, ...]:
        """The tasks whose path from the image to their head runs through node
        ``(layer, stream)`` (empty for an unused node)."""
        return tuple(t for t in range(self.n_tasks) if self.ancestor(layer, t) == stream)

    def reader_sets(self) -> tuple[tuple[int, ...], ...]:
        """The distinct :meth:`readers` of the used nodes, sorted: one row each of a weight
        hypernet that conditions every node on its readers' preference."""
        return self._readers[0]

    def reader_row(self, layer: int, stream: int) -> int | None:
        """Where node ``(layer, stream)``'s readers sit in :meth:`reader_sets` (None: unused)."""
        return self._readers[1].get((layer, stream))

    @cached_property
    def _readers(self) -> tuple[tuple[tuple[int, ...], ...], dict[Node, int]]:
        # computed once per tree: a served switch asks for it on every new preference
        by_node = {(l, j): self.readers(l, j) for l, j in self.node_list()}
        sets = tuple(sorted(set(by_node.values())))
        return sets, {node: sets.index(tasks) for node, tasks in by_node.items()}

    def is_shared(self, layer: int, stream: int, tasks: Iterable[int] | None = None) -> bool:
        """Whether node ``(layer, stream)`` feeds more than one head."""
        heads = range(self.n_tasks) if tasks is None else tasks
        return sum(self.ancestor(layer, t) == stream for t in heads) > 1

    # -- identity and serialization -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "n_tasks": self.n_tasks,
            "n_layers": self.n_layers,
            "parents": [list(row) for row in self.parents],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> Architecture:
        if not isinstance(data, dict) or not {"n_tasks", "n_layers", "parents"} <= data.keys():
            raise ArchitectureError("an architecture needs the keys n_tasks, n_layers and parents")
        parents = data["parents"]
        if not isinstance(parents, list) or not all(isinstance(r, list) for r in parents):
            raise ArchitectureError("parents must be a list of lists of stream indices")
        return cls(
            n_tasks=data["n_tasks"],
            n_layers=data["n_layers"],
            parents=tuple(tuple(row) for row in parents),
        )

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArchitectureError(f"not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @cached_property
    def id(self) -> str:
        """Stable 12-hex id of the tree (sha256 of its canonical JSON)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def __str__(self) -> str:
        rows = " ".join(
            "".join(str(p) for p in row) if self.n_tasks <= 10 else ",".join(str(p) for p in row)
            for row in self.parents
        )
        return f"Architecture(N={self.n_tasks}, L={self.n_layers}, parents=[{rows}], id={self.id})"
