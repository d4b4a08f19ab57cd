"""ControllableModel: the anchor net and its controller, the object ``dymu.load`` returns."""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any

import torch
from torch import nn

from .anchor import AnchorNet, BNDeltas
from .architecture import Architecture
from .budget import (
    Budget,
    BudgetChoice,
    Segment,
    at_c,
    c_segments,
    check_exclusive,
    choose,
    parse_budget,
)
from .config import ConfigTasks, ModelConfig
from .cost import Cost, CostModel
from .errors import ArchitectureError
from .hypernets import EdgeHypernet, WeightHypernet
from .materialize import FoldedAnchor, MaterializedModel, Skeleton
from .preference import Preference, normalize_preference, resolve_tasks

#: Folded trees a model keeps: at most this many, and (beyond the newest) at most
#: max(SKELETON_MIN_BYTES, 2 x the anchor's bytes) of their own tensors (BN vectors and channel
#: indices, ~20 KB each for scenes-small), enough for every tree a controller serves (the
#: shipped scenes-small/v5: 91 over 1,000 random preferences). What they share
#: (dymu.materialize.FoldedAnchor: the folded nodes and the stacked heads of the weight
#: hypernet) is one copy of the anchor's and the heads' weights.
MAX_SKELETONS = 256
SKELETON_MIN_BYTES = 64 * 2**20
_VERSION = operator.attrgetter("_version")
_DATA_PTR = operator.methodcaller("data_ptr")


class ControllableModel(ConfigTasks, nn.Module):
    """Anchor net F + edge hypernet h + weight hypernet h-bar (paper Fig. 2).

    Inference: ``model.materialize(r, c)`` gives the tree for a preference, with adapted BN,
    folded, ready to run. Training code uses :meth:`forward` (the soft forward) and the
    hypernets directly.
    """

    def __init__(self, config: ModelConfig, manifest: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.anchor = AnchorNet(config)
        n, layers, hyper = config.n_tasks, self.anchor.num_layers, config.hypernet
        self.edge_hypernet = EdgeHypernet(n, layers, hyper.embed_dim, hyper.edge_hidden)
        self.weight_hypernet = WeightHypernet(
            n, self.anchor.bn_layout(), hyper.embed_dim, hyper.weight_hidden, hyper.weight_input
        )
        self.cost_model = CostModel(config)
        self._manifest = dict(manifest) if manifest else None
        # Folded trees by (architecture id, task subset), LRU; see materialize().
        self._skeletons: OrderedDict[tuple[str, tuple[int, ...]], Skeleton] = OrderedDict()
        self._skeleton_stamp: tuple[int, int, int] | None = None
        # The folded nodes every skeleton shares, and the anchor's bytes (the skeletons' budget).
        self._folded: FoldedAnchor | None = None
        self._anchor_bytes = 0
        self._skeleton_lock = threading.Lock()
        self._frozen = False
        # Loading weights into the anchor or the heads, through them or through the model
        # (post hooks run for every module a load walks), rebuilds the skeletons even when frozen.
        for part in (self.anchor, self.weight_hypernet):
            part.register_load_state_dict_post_hook(self._weights_loaded)

    # -- description --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.anchor.num_layers

    @property
    def device(self) -> torch.device:
        return next(self.anchor.parameters()).device

    @property
    def manifest(self) -> dict[str, Any]:
        """The artifact's manifest (for a model not loaded from the store: its description)."""
        if self._manifest is not None:
            return dict(self._manifest)
        return describe(self.config)

    @property
    def control_params(self) -> int:
        """Size of the controller (both hypernets): the paper's "Control Params"."""
        return sum(
            p.numel() for m in (self.edge_hypernet, self.weight_hypernet) for p in m.parameters()
        )

    # -- the controller -----------------------------------------------------------------------
    def preference(self, r: Any, c: Any) -> Preference:
        """Validate and normalize ``(r, c)`` (see :func:`dymu.preference.normalize_preference`)."""
        if isinstance(r, Preference):
            return r
        return normalize_preference(r, c, self.tasks)

    def _hyper_like(self) -> dict[str, Any]:
        # the hypernets' device and dtype, so a model converted with .double() still runs
        weight = self.edge_hypernet.embedding.cost_embedding
        return {"device": weight.device, "dtype": weight.dtype}

    def _tensors(self, pref: Preference) -> tuple[torch.Tensor, torch.Tensor]:
        return pref.tensors(**self._hyper_like())

    @torch.no_grad()
    def edge_logits(self, r: Any, c: Any = None) -> torch.Tensor:
        """Edge-hypernet logits (L-1, N, N) for one preference."""
        return self.edge_hypernet(*self._tensors(self.preference(r, c)))

    def architecture(self, r: Any, c: Any = None) -> Architecture:
        """The maximum-likelihood tree for ``(r, c)``: arg-max parent of every child node."""
        return Architecture.from_logits(self.edge_logits(r, c).cpu())

    @torch.no_grad()
    def architectures(self, preferences: Sequence[Preference]) -> list[Architecture]:
        """The arg-max trees of many validated preferences from one batched edge-hypernet pass
        (e.g. a grid over the simplex for a cost map); element i is ``architecture(prefs[i])``."""
        if not preferences:
            return []
        like = self._hyper_like()
        r = torch.tensor([p.r for p in preferences], **like)
        c = torch.tensor([p.c for p in preferences], **like)
        parents = self.edge_hypernet(r, c).argmax(dim=-1).tolist()  # (B, L-1, N): one transfer
        return [Architecture.from_parents(rows, self.n_tasks, self.n_layers) for rows in parents]

    @torch.no_grad()
    def bn_deltas(
        self, r: Any, c: Any = None, nodes: Iterable[tuple[int, int]] | None = None
    ) -> BNDeltas:
        """Weight-hypernet BN deltas for ``(r, c)``, for ``nodes`` (all nodes by default)."""
        pref = self.preference(r, c)
        arch = self.architecture(pref) if self.weight_hypernet.inputs == "readers" else None
        wanted = None if nodes is None else list(nodes)
        return self.weight_hypernet(*self._tensors(pref), wanted, arch)

    def materialize(
        self,
        r: Any,
        c: Any = None,
        tasks: Iterable[str] | str | None = None,
        *,
        adapt: bool = True,
        fold_bn: bool = True,
        architecture: Architecture | None = None,
        budget: Budget | dict[str, float] | None = None,
    ) -> MaterializedModel:
        """The tree for ``(r, c)`` restricted to ``tasks``, BN adapted and folded, in eval mode.

        ``adapt=False`` skips the weight hypernet (the paper's "w/o adaptation");
        ``architecture`` overrides the edge hypernet's choice (e.g. a hand-made tree).
        ``budget`` (instead of ``c``: ``{"max_gflops": x}`` or ``{"max_fraction": f}``) picks
        the lowest c whose tree fits at the model's input size for ``tasks``
        (:meth:`within_budget`; the result's ``preference.c`` is the chosen c).

        A new preference is cheap: the folded structure of each tree is kept (a
        :class:`~dymu.materialize.Skeleton` per tree and task subset, rebuilt when the weights
        change) and only its adapted weights are recomputed, in one vectorized step.
        """
        check_exclusive(c, budget)
        if budget is not None:
            pref = self.within_budget(r, budget, tasks).preference
        else:
            pref = self.preference(r, c)
        task_idx = resolve_tasks(tasks, self.tasks)
        with torch.no_grad():
            arch, z = self.controller(pref, architecture, adapt)
            if not fold_bn:  # the unfolded tree (a reference for tests): built node by node
                nodes = arch.node_list(task_idx)
                deltas = self.weight_hypernet.deltas(z, nodes, arch) if z is not None else None
                return MaterializedModel(
                    self.anchor, arch, task_idx, self.cost_model, deltas, False, pref
                )
            return self._skeleton(arch, task_idx).instantiate(z, pref)

    @torch.no_grad()
    def controller(
        self, pref: Preference, architecture: Architecture | None = None, adapt: bool = True
    ) -> tuple[Architecture, torch.Tensor | None]:
        """Both hypernets in one pass for a validated preference: the arg-max tree (unless
        ``architecture`` is given) and the weight hypernet's features z (None without
        ``adapt``), from which every node's BN deltas are one linear map (see materialize)."""
        r, c = self._tensors(pref)
        if architecture is None:
            parents = self.edge_hypernet(r, c).argmax(dim=-1).tolist()
            architecture = Architecture.from_parents(parents, self.n_tasks, self.n_layers)
        elif (architecture.n_tasks, architecture.n_layers) != (self.n_tasks, self.n_layers):
            raise ArchitectureError(
                f"architecture is N={architecture.n_tasks}, L={architecture.n_layers}; the "
                f"model is N={self.n_tasks}, L={self.n_layers}"
            )
        z = self.weight_hypernet.features(r, c, architecture) if adapt else None
        return architecture, z

    def _weights_stamp(self) -> tuple[int, int, int]:
        """Changes whenever a weight the skeletons were built from changes: an optimizer step
        or ``load_state_dict`` (in-place updates bump a tensor's version counter), ``.to()``
        (new storage) or a parameter replaced by another. Only the anchor's and the weight
        hypernet's heads' tensors count (z is computed afresh for every preference). Their
        registries are cached and read by C-level maps: a walk of the module tree, or a Python
        loop over ~370 tensors, would cost more than the switch it guards. A module replaced by
        another is not seen, which a loaded, frozen model never does."""
        registries = self.__dict__.get("_stamp_registries")
        if registries is None:
            modules = (*self.anchor.modules(), *self.weight_hypernet.heads.modules())
            registries = [d for m in modules for d in (m._parameters, m._buffers)]
            self.__dict__["_stamp_registries"] = registries
        tensors = [t for t in chain.from_iterable(map(dict.values, registries)) if t is not None]
        return len(tensors), sum(map(_VERSION, tensors)), sum(map(_DATA_PTR, tensors))

    def _skeleton(self, arch: Architecture, task_idx: tuple[int, ...]) -> Skeleton:
        key = (arch.id, task_idx)
        trusted = self._frozen and self._folded is not None
        stamp = self._skeleton_stamp if trusted else self._weights_stamp()
        with self._skeleton_lock:
            if stamp != self._skeleton_stamp or self._folded is None:
                self._skeletons.clear()
                self._skeleton_stamp = stamp
                wh = self.weight_hypernet
                heads = {node: wh.head(node) for node in wh.layout}
                self._folded = FoldedAnchor(self.anchor, wh.layout, heads)
                self._anchor_bytes = _nbytes(self.anchor)
            found = self._skeletons.get(key)
            if found is not None:
                self._skeletons.move_to_end(key)
                return found
            folded = self._folded
        made = Skeleton(folded, arch, task_idx, self.cost_model)
        budget = max(SKELETON_MIN_BYTES, 2 * self._anchor_bytes)
        with self._skeleton_lock:
            self._skeletons[key] = made
            while len(self._skeletons) > 1 and (
                len(self._skeletons) > MAX_SKELETONS
                or sum(k.nbytes for k in self._skeletons.values()) > budget
            ):
                self._skeletons.popitem(last=False)
        return made

    # -- frozen weights ---------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` declared the weights final (see there)."""
        return self._frozen

    def freeze(self) -> ControllableModel:
        """Declare the weights final, as a server does: ``materialize`` then trusts the
        skeletons it keeps instead of reading the version counter of every anchor and head
        tensor on each switch (~0.1 ms warm, 0.3-0.4 ms right after a predict on the shipped
        model; docs/core.md, "Frozen weights"). Loading weights (``load_state_dict`` on the
        model, its anchor or its weight hypernet), ``.to()`` and other conversions of the
        model still rebuild, and ``train()`` unfreezes; changing a tensor in place needs
        :meth:`unfreeze` first. Returns the model."""
        self._frozen = True
        return self

    def unfreeze(self) -> ControllableModel:
        """Check the weights on every switch again (the default). Returns the model."""
        self._frozen = False
        return self

    def train(self, mode: bool = True) -> ControllableModel:
        if mode:  # training changes the weights: a frozen model is frozen no more
            self._frozen = False
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> ControllableModel:
        out = super()._apply(fn, recurse)  # .to(), .double(), .cuda(): new tensors
        self._forget_skeletons()
        return out

    def _weights_loaded(self, module: nn.Module, incompatible: Any) -> None:
        self._forget_skeletons()

    def _forget_skeletons(self) -> None:
        with self._skeleton_lock:
            self._skeletons.clear()
            self._folded = None

    # -- budgets (dymu/budget.py) -----------------------------------------------------------
    def c_segments(self, r: Any) -> list[Segment]:
        """The pieces of c in [0, 1] on which the arg-max tree of ``r`` is constant, in order
        of c, each starting at the lowest canonical c of its tree (:func:`dymu.budget.c_segments`).
        ``r`` may be a :class:`Preference` (its c is ignored)."""
        pref = r if isinstance(r, Preference) else self.preference(r, 0.0)
        # One unbatched pass per c, as materialize computes the tree: a batched pass can round
        # differently (another matmul kernel) right where two logits cross.
        return c_segments(lambda units: [self.architecture(at_c(pref, u)) for u in units])

    def within_budget(
        self,
        r: Any,
        budget: Budget | dict[str, float],
        tasks: Iterable[str] | str | None = None,
        input_hw: tuple[int, int] | None = None,
        segments: list[Segment] | None = None,
    ) -> BudgetChoice:
        """The lowest c in [0, 1] whose arg-max tree for ``r`` fits ``budget`` (FLOPs of
        ``tasks`` at ``input_hw``, the model's input size by default): the most accurate tree
        that fits. Raises :class:`~dymu.errors.BudgetInfeasibleError` (naming the cheapest
        cost) when none does. ``segments``: :meth:`c_segments` of ``r``, if already known."""
        pref = r if isinstance(r, Preference) else self.preference(r, 0.0)
        budget = parse_budget(budget)
        task_idx = resolve_tasks(tasks, self.tasks)
        limit = budget.limit_flops(self.anchor_cost(input_hw).flops)

        def cost_of(arch: Architecture) -> Cost:
            return self.cost_model.architecture_cost(arch, input_hw, task_idx)

        segs = self.c_segments(pref) if segments is None else segments
        return choose(pref, segs, self.architecture, cost_of, budget, limit)

    # -- cost -----------------------------------------------------------------------------------
    def cost(
        self,
        architecture: Architecture,
        input_hw: tuple[int, int] | None = None,
        tasks: Iterable[str] | str | None = None,
    ) -> Cost:
        """Analytic FLOPs / params of a tree for a task subset (see :mod:`dymu.cost`)."""
        return self.cost_model.architecture_cost(
            architecture, input_hw, resolve_tasks(tasks, self.tasks)
        )

    def anchor_cost(self, input_hw: tuple[int, int] | None = None) -> Cost:
        """Cost of the full anchor net: all N single-task streams."""
        return self.cost_model.anchor_cost(input_hw)

    # -- training ---------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        nu: Sequence[torch.Tensor],
        bn_deltas: BNDeltas | None = None,
        tasks: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Soft forward of the anchor net (see :meth:`dymu.anchor.AnchorNet.forward_soft`)."""
        return self.anchor.forward_soft(x, nu, bn_deltas, tasks)


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def create_model(config: ModelConfig | dict[str, Any]) -> ControllableModel:
    """A randomly initialized controllable model (weight-hypernet deltas start at zero)."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig.model_validate(config)
    return ControllableModel(config)


def describe(config: ModelConfig) -> dict[str, Any]:
    """The configuration part of a manifest: every field of the config plus derived N and L."""
    from .anchor import build_backbone

    return {
        **config.model_dump(mode="json"),
        "n_tasks": config.n_tasks,
        "n_layers": build_backbone(config.backbone, config.in_channels).num_layers,
    }
