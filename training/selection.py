"""Stream selection: each stream of stage 0 ends at its lowest loss on the calibration split.

A stream trained alone on a small training set can fit it and lose on unseen images (multidigits:
a left-digit stream at 89.8 % on other writers' digits while another stream's path reads them at
97 %, docs/results-training.md, row 35). With ``[anchor] select_every = K``, every K steps of
stage 0 (and once before the first, on the common trunk) each stream's own task loss w_i L_i is
measured on ``select_images`` images of the calibration split (``[data] calibration_options``:
images of the training source that no stage trains on); each stream keeps the state of its
lowest, and the streams are set to those states when the stage ends: early stopping, one
stream at a time. The selection's state is written to the run directory, so a resumed run
continues it. docs/training.md, "Stream selection".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .evaluation.checks import evaluate
from .loop import LOG_FIELDS
from .run import Run

SELECTION = "stream_selection.safetensors"
SELECTION_META = "stream_selection.json"
#: Images per forward pass (bounds memory; the losses do not depend on it).
CHUNK = 256


@dataclass
class StreamSelector:
    """The best state of each stream so far, by its loss on fixed calibration images."""

    run: Run
    every: int
    batches: list[dict]
    best_loss: list[float]
    best_step: list[int | None]
    best_state: list[dict[str, torch.Tensor] | None] = field(default_factory=list)

    @classmethod
    def begin(cls, run: Run, start: int) -> StreamSelector:
        """The selector of stage 0 from step ``start`` (0, or where a resumed run stopped)."""
        cfg = run.config.anchor
        assert cfg.select_every is not None and run.calibration_set is not None
        batches = list(run.sample_batches("stream-selection", cfg.select_images, CHUNK, True))
        n = run.model.anchor.n_tasks
        sel = cls(run, cfg.select_every, batches, [math.inf] * n, [None] * n, [None] * n)
        if start == 0:
            sel.observe(-1)  # the streams as stage 0 finds them (the common trunk's copies)
        else:
            sel._restore()
        return sel

    @torch.no_grad()
    def losses(self) -> list[float]:
        """Each stream's own task loss w_i L_i over the calibration images: the split-level loss
        of the evaluation (:func:`training.evaluation.checks.evaluate`), in eval mode."""
        anchor = self.run.model.anchor
        was_training = anchor.training
        anchor.eval()

        def predict(x: torch.Tensor) -> dict[str, torch.Tensor]:
            with self.run.autocast():
                return anchor(x)

        metrics = evaluate(predict, self.batches, self.run.tasks, device=self.run.device)
        anchor.train(was_training)
        return [metrics[t.name]["loss"] * t.loss_scale for t in self.run.tasks]

    def observe(self, step: int) -> None:
        """After optimizer step ``step`` (-1: before the first): measure on every ``every``-th
        step and at the stage's last, and keep each stream that improved."""
        done = step + 1
        if done % self.every and done != self.run.config.anchor.steps:
            return
        losses = self.losses()
        streams = self.run.model.anchor.streams
        improved = False
        for j, loss in enumerate(losses):
            if loss < self.best_loss[j]:
                self.best_loss[j], self.best_step[j] = loss, done
                state = streams[j].state_dict()
                self.best_state[j] = {k: v.detach().clone() for k, v in state.items()}
                improved = True
        row = {k: "" for k in LOG_FIELDS}
        self.run.log(
            {"stage": "anchor-select", "step": done, "lr": "", "time": "", **row,
             "task_loss": sum(losses)}
        )  # fmt: skip
        if improved:
            self._save()

    def finish(self) -> dict[str, Any]:
        """Set each stream to its best state; what was chosen (for the training record)."""
        for stream, state in zip(self.run.model.anchor.streams, self.best_state, strict=True):
            if state is not None:
                stream.load_state_dict(state)
        names = [t.name for t in self.run.tasks]
        return {
            "every": self.every,
            "images": sum(len(b["image"]) for b in self.batches),
            "steps": dict(zip(names, self.best_step, strict=True)),
            "calibration_loss": dict(zip(names, self.best_loss, strict=True)),
        }

    def _save(self) -> None:
        if not self.run.dist.is_main:
            return
        tensors = {
            f"{j}/{k}": v.cpu().contiguous()
            for j, state in enumerate(self.best_state)
            if state is not None
            for k, v in state.items()
        }
        save_file(tensors, str(self.run.run_dir / SELECTION))
        meta = {"best_loss": self.best_loss, "best_step": self.best_step}
        (self.run.run_dir / SELECTION_META).write_text(json.dumps(meta))

    def _restore(self) -> None:
        meta_path = self.run.run_dir / SELECTION_META
        if not meta_path.exists():
            return
        meta = json.loads(meta_path.read_text())
        self.best_loss, self.best_step = meta["best_loss"], meta["best_step"]
        tensors = load_file(str(self.run.run_dir / SELECTION), device=str(self.run.device))
        for j in range(len(self.best_state)):
            prefix = f"{j}/"
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            self.best_state[j] = state or None
