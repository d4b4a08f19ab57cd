"""The anchor net F: N single-task streams of L blocks, a head per task (paper §3.1).

Node ``(l, j)`` is block ``l`` of stream ``j``. Backbones are recipes chosen by name from
:data:`dymu.backbones.BACKBONES` (re-exported here); each builds the L blocks of one stream and
the head of one task, and names the layers whose outputs the heads read (``taps``: the top
layer, plus e.g. a DeepLabv3+ low-level feature). A head always reads taps from *its own path*
through the tree: in a tree, head ``j``'s low-level feature is the output of the ancestor of
``(L-1, j)`` at the tap layer.

Every convolution that is followed by BatchNorm is a :class:`ConvBNAct`, so that BN can be
modulated by the weight hypernet (by name) and folded into the conv at inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .architecture import Architecture
from .backbones import (
    BACKBONES,
    Backbone,
    ConvBNAct,
    FoldedConv,
    build_backbone,
    register_backbone,
)
from .config import ModelConfig, TaskSpec
from .errors import ConfigError, InputError

#: ``{(layer, stream): {bn_module_name: (delta_gamma, delta_beta)}}`` for one preference.
BNDeltas = Mapping[tuple[int, int], Mapping[str, tuple[torch.Tensor, torch.Tensor]]]


def fold_batchnorm_(module: nn.Module) -> nn.Module:
    """Fold every :class:`ConvBNAct` in ``module`` (in place); returns ``module``."""
    for m in module.modules():
        if isinstance(m, ConvBNAct):
            m.fold_()
    return module


def flatten_folded(module: nn.Module) -> nn.Module:
    """``module`` with every folded :class:`ConvBNAct` replaced by its :class:`FoldedConv` (in
    place; returns the replacement when ``module`` itself is one). Run after
    :func:`fold_batchnorm_`; the outputs do not change."""
    if isinstance(module, ConvBNAct):
        return FoldedConv.from_block(module)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, ConvBNAct):
                parent._modules[name] = FoldedConv.from_block(child)
    return module


def batchnorm_layout(module: nn.Module) -> list[tuple[str, int]]:
    """``[(name, channels)]`` of every BatchNorm2d in ``module``, in registration order."""
    return [
        (name, m.num_features)
        for name, m in module.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    ]


class TaskHead(nn.Module):
    """Wraps a backbone's head body with the task's output convention.

    Body: ``(tap features, output size) -> raw output``; dense bodies upsample to the image size.
    Normals are unit-normalized over channels; other kinds are returned raw (logits, depth).
    """

    def __init__(self, task: TaskSpec, body: nn.Module) -> None:
        super().__init__()
        self.kind = task.kind
        self.body = body

    def forward(self, feats: Sequence[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        y = self.body(feats, out_hw)
        if self.kind == "normals":
            y = unit_normals(y)
        return y


def unit_normals(y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``y / max(||y||_2, eps)`` over channels: ``F.normalize(y, dim=1)``, computed as
    ``y * rsqrt(max(sum y^2, eps^2))``.

    On the CPU, ``F.normalize``'s ``linalg.vector_norm`` over the strided channel dimension of an
    NCHW map took ~1 ms for a 3x96x128 map (a quarter of a small tree's forward in the
    benchmark's profile, docs/benchmarks.md); the sum of squares takes ~0.02 ms. The clamp keeps
    the gradient finite at zero vectors, as F.normalize's does.
    """
    return y * torch.rsqrt(y.square().sum(dim=1, keepdim=True).clamp_min(eps * eps))


class Stream(nn.Module):
    """One single-task network: L blocks and its task's head."""

    def __init__(self, blocks: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head


def check_image(x: torch.Tensor, in_channels: int) -> None:
    """Raise :class:`InputError` unless ``x`` is a float batch of shape (B, in_channels, H, W)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"input must be a tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise InputError(f"input must have shape (B, {in_channels}, H, W), got {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise InputError(f"input has {x.shape[1]} channels, the model takes {in_channels}")
    if not x.is_floating_point():
        raise InputError(f"input must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise InputError(f"input is empty: shape {tuple(x.shape)}")


class AnchorNet(nn.Module):
    """N streams x L blocks + N heads, with the soft (mixture) forward used in training."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        backbone = build_backbone(config.backbone, config.in_channels)
        self.num_layers = backbone.num_layers
        self.taps = tuple(backbone.taps)
        self.in_channels = config.in_channels
        self.task_names = config.task_names
        self.streams = nn.ModuleList(
            Stream(backbone.make_blocks(), TaskHead(task, backbone.make_head(task)))
            for task in config.tasks
        )
        for s in self.streams:
            if len(s.blocks) != self.num_layers:
                raise ConfigError(
                    f"backbone {config.backbone.name!r} built {len(s.blocks)} "
                    f"blocks, declared {self.num_layers}"
                )

    @property
    def n_tasks(self) -> int:
        return len(self.streams)

    def node(self, layer: int, stream: int) -> nn.Module:
        return self.streams[stream].blocks[layer]

    def head(self, stream: int) -> TaskHead:
        return self.streams[stream].head

    def bn_layout(self) -> list[tuple[tuple[int, int], list[tuple[str, int]]]]:
        """Every node's BatchNorms: ``[((layer, stream), [(bn_name, channels), ...]), ...]``."""
        return [
            ((l, j), batchnorm_layout(self.node(l, j)))
            for l in range(self.num_layers)
            for j in range(self.n_tasks)
        ]

    def run_node(
        self, layer: int, stream: int, x: torch.Tensor, bn_deltas: BNDeltas | None = None
    ) -> torch.Tensor:
        """Node ``(layer, stream)`` on ``x``, with BN(gamma + dgamma, beta + dbeta) if given."""
        module = self.node(layer, stream)
        deltas = None if bn_deltas is None else bn_deltas.get((layer, stream))
        if not deltas:
            return module(x)
        overrides = {}
        for name, (dg, db) in deltas.items():
            bn = module.get_submodule(name)
            overrides[f"{name}.weight"] = bn.weight + dg
            overrides[f"{name}.bias"] = bn.bias + db
        return functional_call(module, overrides, (x,), strict=False)

    def forward(
        self, x: torch.Tensor, tasks: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """The full anchor: each requested task's stream alone (the single-task networks)."""
        check_image(x, self.in_channels)
        out = {}
        for j in range(self.n_tasks) if tasks is None else tasks:
            feats, y = [], x
            for l in range(self.num_layers):
                y = self.node(l, j)(y)
                if l in self.taps:
                    feats.append(y)
            out[self.task_names[j]] = self.head(j)(feats, (x.shape[-2], x.shape[-1]))
        return out

    def forward_tree(
        self,
        x: torch.Tensor,
        architecture: Architecture,
        bn_deltas: BNDeltas | None = None,
        tasks: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Differentiable hard forward of one tree: only the used nodes run, each once.

        The training-time twin of :class:`dymu.materialize.MaterializedModel` (BN not folded,
        deltas applied functionally, gradients reach the weight hypernet): stage 2 trains with
        it, on the architecture that inference will use.
        """
        check_image(x, self.in_channels)
        used = architecture.used_nodes(tasks)
        outs: dict[tuple[int, int], torch.Tensor] = {}
        for l, streams in enumerate(used):
            for j in streams:
                inp = x if l == 0 else outs[(l - 1, architecture.parent(l, j))]
                outs[(l, j)] = self.run_node(l, j, inp, bn_deltas)
        out_hw = (x.shape[-2], x.shape[-1])
        return {
            self.task_names[j]: self.head(j)(
                [outs[(t, architecture.ancestor(t, j))] for t in self.taps], out_hw
            )
            for j in used[-1]
        }

    def forward_soft(
        self,
        x: torch.Tensor,
        nu: Sequence[torch.Tensor],
        bn_deltas: BNDeltas | None = None,
        tasks: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Soft forward (training): child ``(l, j)`` reads ``sum_k nu[l-1][j, k] * y_{l-1,k}``.

        ``nu`` holds L-1 tensors of shape (N, N) (child x parent; rows on the simplex), or
        (B, N, N) for one distribution per sample. All N x L nodes run. A head's tap features
        are mixed with the same weights along the way, so with one-hot ``nu`` the result is
        exactly the tree's (:class:`dymu.materialize.MaterializedModel`).
        """
        check_image(x, self.in_channels)
        n, layers = self.n_tasks, self.num_layers
        if len(nu) != layers - 1:
            raise InputError(f"nu needs {layers - 1} tensors (one per boundary), got {len(nu)}")
        outs: list[torch.Tensor] = []
        taps: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for l in range(layers):
            if l == 0:
                inputs = [x] * n
            else:
                w = nu[l - 1]
                if w.shape[-2:] != (n, n):
                    raise InputError(
                        f"nu[{l - 1}] must be (N, N) = ({n}, {n}), got {tuple(w.shape)}"
                    )
                inputs = _mix(w, torch.stack(outs))
                taps = [
                    [
                        _mix_one(w, j, torch.stack([taps[k][t] for k in range(n)]))
                        for t in range(len(taps[0]))
                    ]
                    for j in range(n)
                ]
            outs = [self.run_node(l, j, inputs[j], bn_deltas) for j in range(n)]
            if l in self.taps:
                for j in range(n):
                    taps[j].append(outs[j])
        out_hw = (x.shape[-2], x.shape[-1])
        return {
            self.task_names[j]: self.head(j)(taps[j], out_hw)
            for j in (range(n) if tasks is None else tasks)
        }


def _mix(w: torch.Tensor, ys: torch.Tensor) -> list[torch.Tensor]:
    """Every child's input: ``ys`` (N_parent, B, ...) mixed by ``w`` ((B,) N_child, N_parent)."""
    return [_mix_one(w, j, ys) for j in range(w.shape[-2])]


def _mix_one(w: torch.Tensor, j: int, ys: torch.Tensor) -> torch.Tensor:
    wj = w[..., j, :].to(ys.dtype)  # (N,) or (B, N)
    if wj.ndim == 1:
        return torch.tensordot(wj, ys, dims=1)
    return torch.einsum("bk,kb...->b...", wj, ys)


__all__ = [
    "BACKBONES",
    "AnchorNet",
    "BNDeltas",
    "Backbone",
    "ConvBNAct",
    "FoldedConv",
    "Stream",
    "TaskHead",
    "batchnorm_layout",
    "build_backbone",
    "check_image",
    "flatten_folded",
    "fold_batchnorm_",
    "register_backbone",
    "unit_normals",
]
