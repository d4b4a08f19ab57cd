"""The baselines as *controllable-like* objects (the interface dymu's evaluation uses).

Every method has ``.tasks``, ``.n_tasks``, ``.config`` (a :class:`dymu.ModelConfig`),
``.control_params`` (the hypernetwork's size) and ``.materialize(r, c=None, tasks=None)``, an
eval-mode ``nn.Module`` whose ``forward(images)`` returns ``{task: prediction}`` like
:class:`dymu.MaterializedModel` and whose ``.cost(input_hw)`` is the analytic
:class:`dymu.Cost`. The baselines have one architecture, so ``c`` is validated and ignored.

============ ==================================================================================
kind         what is generated from r (on a hard-shared network, :mod:`.shared`)
============ ==================================================================================
phn          every parameter (PHN, Navon et al. 2021), by a chunked hypernetwork
phn-bn       the BN gamma/beta, as deltas on the network's own (PHN-BN, paper §4.2)
cpmtl        the task heads; the shared encoder is the network's own (Lin et al. 2020)
static       nothing: one network trained for one fixed preference r_k (paper Fig. 6)
============ ==================================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from dymu.anchor import fold_batchnorm_
from dymu.architecture import Architecture
from dymu.config import ConfigTasks, ModelConfig
from dymu.materialize import MaterializedModel
from dymu.model import ControllableModel, describe
from dymu.preference import Preference, normalize_preference, resolve_tasks
from dymu.shared import HardSharedNet

from .hypernets import BatchNormHypernet, ChunkedHypernet


class GeneratorOptions(BaseModel):
    """Sizes of a baseline's hypernetwork (from the training config; stored in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    embed_dim: int = Field(default=32, ge=1)
    hidden: tuple[int, ...] = (100, 100, 100)
    chunk_size: int = Field(default=1024, ge=1)
    chunk_embed_dim: int = Field(default=32, ge=1)


def _demote_parameters(net: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Turn the parameters of ``net`` under ``prefix`` into non-persistent buffers.

    Their values then come from a generator at every forward (``functional_call``); as buffers
    they are neither trained nor saved, and only keep the default initialization that sets the
    generator's output scale. Returns ``{name: initial value}``.
    """
    targets = {}
    for name, param in list(net.named_parameters()):
        if not name.startswith(prefix):
            continue
        owner, _, attr = name.rpartition(".")
        module = net.get_submodule(owner)
        del module._parameters[attr]
        module.register_buffer(attr, param.detach(), persistent=False)
        targets[name] = param.detach()
    return targets


class Baseline(ConfigTasks, nn.Module):
    """A hard-shared network and (except for ``static``) a generator of some of its parameters.

    ``forward(images, r)`` is the training forward (differentiable in the generator);
    :meth:`materialize` gives the plain network of one preference, BN folded.
    """

    kind: ClassVar[str]

    def __init__(self, config: ModelConfig, options: GeneratorOptions | None = None) -> None:
        super().__init__()
        self.config = config
        self.options = options or GeneratorOptions()
        self.net = HardSharedNet(config)
        self.generator: nn.Module | None = self._build_generator()
        self.manifest: dict[str, Any] = describe(config)

    def _build_generator(self) -> nn.Module | None:
        return None

    # -- the controllable-like interface ------------------------------------------------------
    @property
    def control_params(self) -> int:
        """Size of the hypernetwork (the paper's "Control Params"); 0 without one."""
        return 0 if self.generator is None else int(self.generator.control_params)

    @property
    def device(self) -> torch.device:
        return next(iter(self.net.state_dict().values())).device

    def preference(self, r: Any, c: Any = None) -> Preference:
        """Validated, normalized preference; ``c`` (default 0) is checked and then ignored."""
        return normalize_preference(r, 0.0 if c is None else c, self.tasks)

    def generated(self, r: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generator's tensors for ``r`` (shape (N,)): ``{parameter name: tensor}``."""
        return {} if self.generator is None else self.generator(r, self.net)

    def forward(self, images: torch.Tensor, r: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training forward: the shared network with the generated tensors of ``r``."""
        if self.generator is None:
            return self.net(images)
        return functional_call(self.net, self.generated(r), (images,), strict=False)

    @torch.no_grad()
    def materialize(
        self, r: Any, c: Any = None, tasks: Iterable[str] | str | None = None
    ) -> HardSharedNet:
        """The network of preference ``r`` with the heads of ``tasks``, eval mode, BN folded."""
        pref = self.preference(r, c)
        names = [self.tasks[j] for j in resolve_tasks(tasks, self.tasks)]
        r_t = pref.tensors(device=self.device)[0]
        state = {**self.net.state_dict(), **self.generated(r_t)}
        with torch.device("meta"):
            net = HardSharedNet(self.config, names)
        wanted = net.state_dict()
        net.load_state_dict({k: state[k].detach().clone() for k in wanted}, assign=True)
        net.requires_grad_(False).eval()
        fold_batchnorm_(net)
        net.preference = pref
        return net


class PHN(Baseline):
    """Pareto HyperNetwork: a chunked hypernetwork generates *all* weights of the network."""

    kind = "phn"

    def _build_generator(self) -> nn.Module:
        o = self.options
        targets = _demote_parameters(self.net)
        return ChunkedHypernet(
            self.n_tasks, targets, o.embed_dim, o.hidden, o.chunk_size, o.chunk_embed_dim
        )


class PHNBN(Baseline):
    """PHN-BN: the network's own weights; the hypernetwork predicts its BN gamma and beta."""

    kind = "phn-bn"

    def _build_generator(self) -> nn.Module:
        return BatchNormHypernet(self.net, self.options.embed_dim, self.options.hidden)


class CPMTL(Baseline):
    """Controllable Pareto MTL: shared encoder (own weights), heads generated from r."""

    kind = "cpmtl"

    def _build_generator(self) -> nn.Module:
        o = self.options
        targets = _demote_parameters(self.net, prefix="heads.")
        return ChunkedHypernet(
            self.n_tasks, targets, o.embed_dim, o.hidden, o.chunk_size, o.chunk_embed_dim
        )


class StaticMTL(Baseline):
    """One hard-shared network trained for the fixed preference ``r`` (r and c are ignored)."""

    kind = "static"

    def __init__(
        self,
        config: ModelConfig,
        options: GeneratorOptions | None = None,
        r: Sequence[float] | None = None,
    ) -> None:
        super().__init__(config, options)
        fixed = [1.0] * config.n_tasks if r is None else list(r)
        self.r: tuple[float, ...] = normalize_preference(fixed, 0.0, config.task_names).r
        self.train_seconds: float = 0.0


#: The trainable baselines by name (``dymu baselines --methods``).
BASELINES: dict[str, type[Baseline]] = {cls.kind: cls for cls in (PHN, PHNBN, CPMTL, StaticMTL)}


class StaticSet(ConfigTasks):
    """K static networks as one method: ``materialize(r)`` serves the one whose r_k is nearest.

    ``members`` keep their own ``r`` and ``train_seconds`` (HV against training time, Fig. 6).
    """

    kind = "static"

    def __init__(self, members: Sequence[StaticMTL], manifest: dict[str, Any] | None = None):
        if not members:
            raise ValueError("a static set needs at least one network")
        self.members = list(members)
        self.config = self.members[0].config
        self.manifest = dict(manifest or {})

    control_params = 0

    @property
    def train_seconds(self) -> float:
        return sum(m.train_seconds for m in self.members)

    def nearest(self, r: Any, c: Any = None) -> StaticMTL:
        pref = normalize_preference(r, 0.0 if c is None else c, self.tasks)
        target = torch.tensor(pref.r)
        return min(self.members, key=lambda m: float((torch.tensor(m.r) - target).norm()))

    def materialize(
        self, r: Any, c: Any = None, tasks: Iterable[str] | str | None = None
    ) -> HardSharedNet:
        return self.nearest(r, c).materialize(r, c, tasks)


class SingleTask(ConfigTasks):
    """The Single-Task row: the anchor's streams alone (fully branched tree, no adaptation)."""

    kind = "single-task"
    control_params = 0

    def __init__(self, model: ControllableModel) -> None:
        self.model = model
        self.config = model.config
        self.manifest = model.manifest

    def materialize(
        self, r: Any, c: Any = None, tasks: Iterable[str] | str | None = None
    ) -> MaterializedModel:
        tree = Architecture.fully_branched(self.model.n_tasks, self.model.n_layers)
        c = 0.0 if c is None else c
        return self.model.materialize(r, c, tasks, adapt=False, architecture=tree)
