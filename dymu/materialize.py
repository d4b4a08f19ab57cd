"""The materialized model: the tree for one preference, as a plain inference module.

Only the used nodes are kept (each a copy of the anchor's block, with the weight hypernet's BN
deltas added to gamma and beta and BN folded into the preceding conv); they run once each, in
topological (layer) order, and a parent's output is reused by all its children. Each requested
head reads its tap features from its own path through the tree. Its outputs equal the anchor's
soft forward with one-hot ``nu`` and the same deltas (tested to 1e-4 in float32).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .anchor import AnchorNet, BNDeltas, check_image, flatten_folded, fold_batchnorm_
from .architecture import Architecture, Node
from .cost import Cost, CostModel
from .preference import Preference


def _key(layer: int, stream: int) -> str:
    return f"l{layer}_s{stream}"


def clone_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its own tensors and no hooks, much faster than deepcopy.

    ``copy.deepcopy`` walks every attribute of every submodule in Python (about 70 % of the
    materialization time of the default model); this copies the module objects shallowly and
    clones only the parameter and buffer tensors. Containers are copied so that nothing done
    to the clone (hooks, new submodules) reaches the anchor.
    """
    new = copy.copy(module)
    for key, value in module.__dict__.items():
        if "hooks" in key and isinstance(value, dict):
            new.__dict__[key] = type(value)()
        elif isinstance(value, (dict, set, list)):
            new.__dict__[key] = copy.copy(value)
    new._parameters = {
        k: None if p is None else nn.Parameter(p.detach().clone(), requires_grad=False)
        for k, p in module._parameters.items()
    }
    new._buffers = {k: None if b is None else b.clone() for k, b in module._buffers.items()}
    new._modules = {k: None if m is None else clone_module(m) for k, m in module._modules.items()}
    return new


@torch.no_grad()
def _adapted_copy(module: nn.Module, deltas: dict | None, fold_bn: bool) -> nn.Module:
    module = clone_module(module)
    for name, (dgamma, dbeta) in (deltas or {}).items():
        bn = module.get_submodule(name)
        bn.weight.add_(dgamma.to(bn.weight))
        bn.bias.add_(dbeta.to(bn.bias))
    if fold_bn:  # each folded block becomes one module: fewer to copy and to call
        module = flatten_folded(fold_batchnorm_(module))
    return module.eval().requires_grad_(False)  # after folding: the modules it made too


class MaterializedModel(nn.Module):
    """The tree-structured sub-network of one preference; ``forward(x) -> {task: tensor}``."""

    def __init__(
        self,
        anchor: AnchorNet,
        architecture: Architecture,
        tasks: Sequence[int],
        cost_model: CostModel,
        bn_deltas: BNDeltas | None = None,
        fold_bn: bool = True,
        preference: Preference | None = None,
        folded: FoldedAnchor | None = None,
    ) -> None:
        """``folded``: take the folded, unadapted nodes and heads from it (shared with every
        tree built from it) instead of copying and folding them here; nodes with deltas and
        unfolded trees are still copied."""
        super().__init__()
        if (architecture.n_tasks, architecture.n_layers) != (anchor.n_tasks, anchor.num_layers):
            raise ValueError("architecture does not fit the anchor net")
        self.architecture = architecture
        self.preference = preference
        self.task_indices = tuple(sorted(tasks))
        self.tasks = tuple(anchor.task_names[j] for j in self.task_indices)
        self.in_channels = anchor.in_channels
        self.bn_folded = fold_bn
        self._cost_model = cost_model
        used = architecture.used_nodes(self.task_indices)
        deltas = bn_deltas or {}
        shared = folded if fold_bn else None

        self.nodes = nn.ModuleDict()
        # (node, parent node or None for the image), in topological order.
        self._plan: list[tuple[Node, Node | None]] = []
        for layer, streams in enumerate(used):
            for j in streams:
                own = deltas.get((layer, j))
                self.nodes[_key(layer, j)] = (
                    shared.node(layer, j)
                    if shared is not None and not own
                    else _adapted_copy(anchor.node(layer, j), own, fold_bn)
                )
                parent = None if layer == 0 else (layer - 1, architecture.parent(layer, j))
                self._plan.append(((layer, j), parent))

        self.heads = nn.ModuleDict()
        self._head_taps: list[tuple[str, list[Node]]] = []
        for j in used[-1]:
            name = anchor.task_names[j]
            self.heads[name] = (
                shared.head(j)
                if shared is not None
                else _adapted_copy(anchor.head(j), None, fold_bn)
            )
            self._head_taps.append((name, [(t, architecture.ancestor(t, j)) for t in anchor.taps]))

        # Drop each intermediate output after its last reader, so peak memory follows the tree.
        tapped = {n for _, nodes in self._head_taps for n in nodes}
        last_use: dict[Node, int] = {}
        for step, (_, parent) in enumerate(self._plan):
            if parent is not None:
                last_use[parent] = step
        self._free_after: list[list[Node]] = [[] for _ in self._plan]
        for node, step in last_use.items():
            if node not in tapped:
                self._free_after[step].append(node)
        # Every node and head is an eval-mode copy already (shared ones too): walking them all
        # again with eval() took half of a new tree's build.
        for module in (self, self.nodes, self.heads):
            module.training = False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_image(x, self.in_channels)
        outs: dict[Node, torch.Tensor] = {}
        for step, (node, parent) in enumerate(self._plan):
            outs[node] = self.nodes[_key(*node)](x if parent is None else outs[parent])
            for done in self._free_after[step]:
                del outs[done]
        out_hw = (x.shape[-2], x.shape[-1])
        return {
            name: self.heads[name]([outs[n] for n in taps], out_hw)
            for name, taps in self._head_taps
        }

    def cost(self, input_hw: tuple[int, int] | None = None) -> Cost:
        """Analytic FLOPs and params of this tree per image at ``input_hw`` (model size default)."""
        return self._cost_model.architecture_cost(self.architecture, input_hw, self.task_indices)

    @property
    def num_nodes(self) -> int:
        return len(self._plan)

    def extra_repr(self) -> str:
        return (
            f"tasks={self.tasks}, architecture={self.architecture.id}, bn_folded={self.bn_folded}"
        )


# ------------------------------------------------------------------------------ fast switch
#: A module's hook registries and their types: a copy gets empty ones, so hooking it never
#: reaches the original.
_HOOK_DICTS = tuple(
    (k, type(v)) for k, v in nn.Module().__dict__.items() if "hooks" in k and isinstance(v, dict)
)


def _frozen_parameter(tensor: torch.Tensor) -> nn.Parameter:
    # What nn.Parameter(tensor, requires_grad=False) does, without its Python layers: a switch
    # makes one per adapted weight and bias (docs/benchmarks.md, "Issue 15, item 1").
    return torch.Tensor._make_subclass(nn.Parameter, tensor, False)


def share_module(
    module: nn.Module, replace: Mapping[int, Mapping[str, torch.Tensor]], copied: frozenset[int]
) -> nn.Module:
    """A copy of ``module`` that differs from it only in the parameters named in ``replace``
    (``{id(submodule): {name: tensor}}``).

    Only the modules in ``copied`` (those that hold a replaced parameter, and their ancestors)
    are copied, shallowly and without the Python machinery of ``copy.copy``; every other
    submodule and every other tensor is *shared* with ``module``. That is what makes a new
    preference cheap, and it is safe because a materialized tree is frozen (no gradients, eval
    mode) and its shared weights are the same for every preference of that tree.
    """
    new = object.__new__(type(module))
    d = module.__dict__.copy()
    for key, kind in _HOOK_DICTS:
        d[key] = kind()
    params = d["_parameters"] = dict(d["_parameters"])
    for name, tensor in replace.get(id(module), {}).items():
        if name in params:
            params[name] = _frozen_parameter(tensor)
    d["_buffers"] = dict(d["_buffers"])
    children = d["_modules"] = dict(d["_modules"])
    for name, child in children.items():  # same keys: no resize while iterating
        if child is not None and id(child) in copied:
            children[name] = share_module(child, replace, copied)
    object.__setattr__(new, "__dict__", d)
    return new


@dataclass(frozen=True)
class AdaptedNode:
    """What a :class:`Skeleton` needs of one node the weight hypernet adapts; the same for
    every tree that uses the node. Per adapted conv, in the order of the node's head: the id of
    its :class:`~dymu.anchor.FoldedConv` in the folded node and the anchor's unfolded weight
    (``weights``); per channel (``vectors``, 4 x channels) gamma, beta,
    sqrt(var + eps) and conv bias - running mean; ``channels``, the node's channels in
    :attr:`FoldedAnchor.delta_weight`'s order; and ``inner``, the ids of the folded node's
    modules from the node down to each adapted conv (the ones a new preference must copy)."""

    convs: tuple[int, ...]
    weights: tuple[torch.Tensor, ...]
    vectors: torch.Tensor
    channels: torch.Tensor
    inner: frozenset[int]


class FoldedAnchor:
    """The anchor's nodes and heads, each copied and BN-folded once when a tree first needs it,
    and each adapted node's :class:`AdaptedNode`: what every tree's :class:`Skeleton` shares.

    A tree seen for the first time then only wires nodes that are already folded (and gathers
    its adapted nodes' channels), where copying and folding them took most of its cost. The
    weight hypernet's heads are stacked here once (``delta_weight``, ``delta_bias``). The
    shared modules are frozen (eval mode, no gradients) and never changed: a preference gets
    shallow copies of the ones it adapts (:func:`share_module`).
    """

    def __init__(
        self,
        anchor: AnchorNet,
        layout: Mapping[Node, Sequence[tuple[str, int]]],
        delta_heads: Mapping[Node, nn.Linear],
    ) -> None:
        self.anchor = anchor
        self.layout = layout
        # Every node's head stacked: [dgamma; dbeta] of every channel of the layout is one
        # matmul of z with delta_weight (a tree picks its channels), so a skeleton keeps no
        # copy of its rows and many trees fit in memory at once.
        self.offsets: dict[Node, int] = {}
        gamma_w, beta_w, gamma_b, beta_b = [], [], [], []
        self.n_channels = 0
        for node, convs in layout.items():
            width = sum(ch for _, ch in convs)
            w, b = delta_heads[node].weight.detach(), delta_heads[node].bias.detach()
            gamma_w.append(w[:width])
            beta_w.append(w[width:])
            gamma_b.append(b[:width])
            beta_b.append(b[width:])
            self.offsets[node] = self.n_channels
            self.n_channels += width
        device = next(anchor.parameters()).device
        self.delta_weight = (
            torch.cat(gamma_w + beta_w) if gamma_w else torch.zeros(0, 1, device=device)
        )
        self.delta_bias = torch.cat(gamma_b + beta_b) if gamma_b else torch.zeros(0, device=device)
        self._nodes: dict[Node, nn.Module] = {}
        self._heads: dict[int, nn.Module] = {}
        self._adapted: dict[Node, AdaptedNode] = {}

    def node(self, layer: int, stream: int) -> nn.Module:
        found = self._nodes.get((layer, stream))
        if found is None:  # setdefault: two threads folding the same node keep one copy
            made = _adapted_copy(self.anchor.node(layer, stream), None, True)
            found = self._nodes.setdefault((layer, stream), made)
        return found

    def head(self, stream: int) -> nn.Module:
        found = self._heads.get(stream)
        if found is None:
            found = self._heads.setdefault(
                stream, _adapted_copy(self.anchor.head(stream), None, True)
            )
        return found

    @torch.no_grad()
    def adapted(self, node: Node) -> AdaptedNode:
        found = self._adapted.get(node)
        if found is None:
            found = self._adapted.setdefault(node, self._adapt_parts(node))
        return found

    def _adapt_parts(self, node: Node) -> AdaptedNode:
        folded, a_node = self.node(*node), self.anchor.node(*node)
        width = sum(ch for _, ch in self.layout[node])
        convs, rows, vecs, inner = [], [], [], {id(folded)}
        for name, _ in self.layout[node]:
            path = name.rsplit(".", 1)[0] if "." in name else ""
            cba = a_node.get_submodule(path)
            conv, bn = cba[0], cba[1]
            target = folded.get_submodule(path)  # the block's FoldedConv
            convs.append(id(target))
            rows.append(conv.weight.detach())
            b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            std = torch.sqrt(bn.running_var + bn.eps)
            vecs.append(torch.stack([bn.weight, bn.bias, std, b - bn.running_mean]).detach())
            parts = path.split(".") if path else []
            inner |= {id(folded.get_submodule(".".join(parts[:i]))) for i in range(len(parts) + 1)}
        start = self.offsets[node]
        channels = torch.arange(start, start + width, device=self.delta_weight.device)
        return AdaptedNode(
            tuple(convs), tuple(rows), torch.cat(vecs, dim=1), channels, frozenset(inner)
        )


class Skeleton:
    """One tree (architecture + task subset) of one anchor, folded once; a new preference only
    recomputes the folded weights of its adapted convolutions.

    Every BatchNorm of a node is part of a :class:`~dymu.anchor.ConvBNAct`, and folding it is
    ``w' = w * s``, ``b' = beta' + (b - mean) * s`` with ``s = gamma' / sqrt(var + eps)``,
    ``gamma' = gamma + dgamma`` and ``beta' = beta + dbeta``. The skeleton keeps ``gamma``,
    ``beta``, ``sqrt(var + eps)``, ``b - mean`` and the unfolded weights of *all* the tree's
    adapted convolutions as flat vectors, in the order of the weight hypernet's heads, and where
    those channels sit in its :class:`FoldedAnchor`'s stacked heads; :meth:`instantiate` then
    runs one matmul for the deltas of the whole layout, picks the tree's, and a handful of
    vector ops fold them all (the same arithmetic as
    :meth:`~dymu.anchor.ConvBNAct.fold_`), and shares every other tensor (heads, nodes without
    BN) with the template. The template's nodes come from a :class:`FoldedAnchor`, shared
    with every other tree of that anchor.
    """

    def __init__(
        self,
        folded: FoldedAnchor,
        architecture: Architecture,
        tasks: Sequence[int],
        cost_model: CostModel,
    ) -> None:
        self.template = MaterializedModel(
            folded.anchor, architecture, tasks, cost_model, folded=folded
        )
        used = [n for n in architecture.node_list(self.template.task_indices) if n in folded.layout]
        parts = [folded.adapted(n) for n in used]
        self.convs = [conv for p in parts for conv in p.convs]
        self.copied = (
            frozenset({id(self.template), id(self.template.nodes)}).union(*(p.inner for p in parts))
            if self.convs
            else frozenset()
        )
        self.weights = [w for p in parts for w in p.weights]  # unfolded, (out, in, kh, kw)
        self.chans = [w.shape[0] for w in self.weights]
        self.folded = folded
        if self.convs:
            vectors = torch.cat([p.vectors for p in parts], dim=1)
            channels = torch.cat([p.channels for p in parts])
        else:  # a tree without BatchNorm: nothing to adapt or fold
            vectors = torch.zeros(4, 0, device=folded.delta_weight.device)
            channels = torch.zeros(0, dtype=torch.long, device=vectors.device)
        self.vectors = vectors
        self.gamma, self.beta, self.std, self.shift = vectors.unbind(0)
        # where this tree's [dgamma; dbeta] sit in the deltas of the whole layout, and in which
        # row of z (one per reader set) when the weight hypernet reads its readers' preference
        self.delta_index = torch.cat([channels, channels + folded.n_channels])
        rows = [
            torch.full((len(p.channels),), architecture.reader_row(*n)) for n, p in zip(used, parts)
        ]
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        self.delta_rows = torch.cat([rows, rows]).to(channels.device)

    @property
    def nbytes(self) -> int:
        """Bytes this skeleton holds of its own: its per-channel vectors and where its channels
        sit in the stacked heads (the folded nodes and the heads belong to the
        :class:`FoldedAnchor`)."""
        own = (self.vectors, self.delta_index, self.delta_rows)
        return sum(t.numel() * t.element_size() for t in own)

    @property
    def n_channels(self) -> int:
        return int(self.gamma.numel())

    def fold(self, z: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Folded (weights per conv, all biases) for the weight-hypernet features ``z`` (None: no
        adaptation; (K, D): a row per reader set, :meth:`dymu.hypernets.WeightHypernet.features`),
        the arithmetic of :meth:`~dymu.anchor.ConvBNAct.fold_`, vectorized."""
        gamma, beta = self.gamma, self.beta
        if z is not None and self.n_channels:
            f = self.folded
            deltas = torch.nn.functional.linear(z, f.delta_weight, f.delta_bias)
            if z.ndim == 2:  # every channel's delta from its node's row
                picked = deltas[self.delta_rows, self.delta_index]
            else:
                picked = deltas.index_select(-1, self.delta_index)
            dgamma, dbeta = picked.chunk(2)
            gamma, beta = gamma + dgamma, beta + dbeta
        scale = gamma / self.std
        # w' = w * s per output channel, every conv at once (one fused C++ loop over the list)
        folded = torch._foreach_mul(self.weights, list(scale.view(-1, 1, 1, 1).split(self.chans)))
        return folded, beta + self.shift * scale

    def instantiate(
        self, z: torch.Tensor | None, preference: Preference | None
    ) -> MaterializedModel:
        """The tree's :class:`MaterializedModel` for BN-delta features ``z``."""
        weights, biases = self.fold(z)
        replace = {
            conv_id: {"weight": w, "bias": b}
            for conv_id, w, b in zip(self.convs, weights, biases.split(self.chans), strict=True)
        }
        net = share_module(self.template, replace, self.copied)
        net.__dict__["preference"] = preference  # a plain attribute (Module.__setattr__ is slow)
        return net
