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

import torch
from torch import nn

from .anchor import AnchorNet, BNDeltas, check_image, fold_batchnorm_
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
    module = clone_module(module).eval()
    for name, (dgamma, dbeta) in (deltas or {}).items():
        bn = module.get_submodule(name)
        bn.weight.add_(dgamma.to(bn.weight))
        bn.bias.add_(dbeta.to(bn.bias))
    if fold_bn:
        fold_batchnorm_(module)
    return module.requires_grad_(False)


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
    ) -> None:
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

        self.nodes = nn.ModuleDict()
        # (node, parent node or None for the image), in topological order.
        self._plan: list[tuple[Node, Node | None]] = []
        for layer, streams in enumerate(used):
            for j in streams:
                self.nodes[_key(layer, j)] = _adapted_copy(
                    anchor.node(layer, j), deltas.get((layer, j)), fold_bn
                )
                parent = None if layer == 0 else (layer - 1, architecture.parent(layer, j))
                self._plan.append(((layer, j), parent))

        self.heads = nn.ModuleDict()
        self._head_taps: list[tuple[str, list[Node]]] = []
        for j in used[-1]:
            name = anchor.task_names[j]
            self.heads[name] = _adapted_copy(anchor.head(j), None, fold_bn)
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
        self.eval()

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
#: A module's hook registries: a copy gets empty ones, so hooking it never reaches the original.
_HOOK_DICTS = tuple(
    k for k, v in nn.Module().__dict__.items() if "hooks" in k and isinstance(v, dict)
)


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
    for k in _HOOK_DICTS:
        if k in d:
            d[k] = type(d[k])()
    own = replace.get(id(module))
    params = d["_parameters"]
    d["_parameters"] = (
        {k: nn.Parameter(own[k], requires_grad=False) if k in own else p for k, p in params.items()}
        if own
        else dict(params)
    )
    d["_buffers"] = dict(d["_buffers"])
    d["_modules"] = {
        k: share_module(m, replace, copied) if m is not None and id(m) in copied else m
        for k, m in d["_modules"].items()
    }
    object.__setattr__(new, "__dict__", d)
    return new


class Skeleton:
    """One tree (architecture + task subset) of one anchor, folded once; a new preference only
    recomputes the folded weights of its adapted convolutions.

    Every BatchNorm of a node is part of a :class:`~dymu.anchor.ConvBNAct`, and folding it is
    ``w' = w * s``, ``b' = beta' + (b - mean) * s`` with ``s = gamma' / sqrt(var + eps)``,
    ``gamma' = gamma + dgamma`` and ``beta' = beta + dbeta``. The skeleton keeps ``gamma``,
    ``beta``, ``sqrt(var + eps)``, ``b - mean`` and the unfolded weights of *all* the tree's
    adapted convolutions as flat vectors, in the order of the weight hypernet's heads, plus
    those heads' rows stacked into one matrix; :meth:`instantiate` then runs one matmul for all
    deltas and a handful of vector ops for all foldings (the same arithmetic as
    :meth:`~dymu.anchor.ConvBNAct.fold_`), and shares every other tensor (heads, nodes without
    BN) with the template.
    """

    def __init__(
        self,
        anchor: AnchorNet,
        architecture: Architecture,
        tasks: Sequence[int],
        cost_model: CostModel,
        layout: Mapping[Node, Sequence[tuple[str, int]]],
        heads: Mapping[Node, nn.Linear],
    ) -> None:
        self.template = MaterializedModel(anchor, architecture, tasks, cost_model)
        nodes = [n for n in architecture.node_list(self.template.task_indices) if n in layout]
        convs, ws, vecs, rows = [], [], [], []
        for node in nodes:
            t_node, a_node = self.template.nodes[_key(*node)], anchor.node(*node)
            head, width = heads[node], sum(ch for _, ch in layout[node])
            offset = 0
            for name, ch in layout[node]:
                path = name.rsplit(".", 1)[0] if "." in name else ""
                cba = a_node.get_submodule(path)
                conv, bn = cba[0], cba[1]
                convs.append((id(t_node.get_submodule(path)[0]), tuple(conv.weight.shape)))
                ws.append(conv.weight.detach().reshape(-1))
                b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                std = torch.sqrt(bn.running_var + bn.eps)
                vecs.append(torch.stack([bn.weight, bn.bias, std, b - bn.running_mean]).detach())
                sel = slice(offset, offset + ch)
                g_w, b_w = head.weight[sel], head.weight[width + offset : width + offset + ch]
                g_b, b_b = head.bias[sel], head.bias[width + offset : width + offset + ch]
                rows.append((g_w, b_w, g_b, b_b))
                offset += ch
        self.convs = convs
        self.copied = _ancestors(self.template, {conv_id for conv_id, _ in convs})
        if not convs:  # a tree without BatchNorm: nothing to adapt or fold
            vecs = [torch.zeros(4, 0)]
            rows = [(torch.zeros(0, 1),) * 2 + (torch.zeros(0),) * 2]
        self.chans = [shape[0] for _, shape in convs]
        # unfolded weights as (out channels, rest) rows, so a per-channel scale broadcasts
        self.weight_rows = [w.reshape(ch, -1) for w, ch in zip(ws, self.chans)]
        self.gamma, self.beta, self.std, self.shift = torch.cat(vecs, dim=1).unbind(0)
        # [dgamma; dbeta] of every adapted channel = z @ delta_weight.T + delta_bias: one matmul
        self.delta_weight = torch.cat([r[0] for r in rows] + [r[1] for r in rows]).detach()
        self.delta_bias = torch.cat([r[2] for r in rows] + [r[3] for r in rows]).detach()

    @property
    def nbytes(self) -> int:
        """Bytes this skeleton holds of its own (its folded template's weights)."""
        return sum(t.numel() * t.element_size() for t in self.template.parameters())

    @property
    def n_channels(self) -> int:
        return int(self.gamma.numel())

    def fold(self, z: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Folded (weights per conv, all biases) for the weight-hypernet features ``z`` (None: no
        adaptation); the arithmetic of :meth:`~dymu.anchor.ConvBNAct.fold_`, vectorized."""
        gamma, beta = self.gamma, self.beta
        if z is not None and self.n_channels:
            deltas = torch.nn.functional.linear(z, self.delta_weight, self.delta_bias)
            dgamma, dbeta = deltas.chunk(2)
            gamma, beta = gamma + dgamma, beta + dbeta
        scale = gamma / self.std
        # w' = w * s per output channel, every conv at once (one fused C++ loop over the list)
        folded = torch._foreach_mul(self.weight_rows, list(scale[:, None].split(self.chans)))
        return folded, beta + self.shift * scale

    def instantiate(
        self, z: torch.Tensor | None, preference: Preference | None
    ) -> MaterializedModel:
        """The tree's :class:`MaterializedModel` for BN-delta features ``z``."""
        weights, biases = self.fold(z)
        replace = {
            conv_id: {"weight": w.view(shape), "bias": b}
            for (conv_id, shape), w, b in zip(
                self.convs, weights, biases.split(self.chans), strict=True
            )
        }
        net = share_module(self.template, replace, self.copied)
        net.__dict__["preference"] = preference  # a plain attribute (Module.__setattr__ is slow)
        return net


def _ancestors(root: nn.Module, targets: set[int]) -> frozenset[int]:
    """Ids of the modules of ``root`` that are, or contain, a module whose id is in ``targets``."""
    found: set[int] = set()
    for name, module in root.named_modules(remove_duplicate=False):
        if id(module) in targets:
            parts = name.split(".") if name else []
            for i in range(len(parts) + 1):
                found.add(id(root.get_submodule(".".join(parts[:i]))))
    return frozenset(found)
