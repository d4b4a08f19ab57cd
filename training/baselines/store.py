"""Baseline directories: ``model.safetensors`` + ``manifest.json``, checksummed like dymu's store.

A baseline directory appears by an atomic rename of a fully written temporary directory, and
:func:`load_method` verifies every sha256 (``dymu.store.verify_artifact``) before it builds
anything. The K static networks live in ``static/k<i>/`` (one baseline directory each) under a
``static/manifest.json`` that lists them with their preference and training time.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

import dymu
from dymu.device import resolve_device
from dymu.errors import ArtifactError, validation_message
from dymu.model import describe
from dymu.shared import shared_cost
from dymu.store import (
    MANIFEST,
    config_from_manifest,
    file_entry,
    verify_artifact,
    write_manifest,
)

from .methods import BASELINES, Baseline, GeneratorOptions, StaticMTL, StaticSet

FORMAT = "dymu-baseline"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
STATIC_SET = "static-set"


def save_baseline(
    model: Baseline,
    out: str | os.PathLike,
    *,
    training: Mapping[str, Any] | None = None,
    input_normalization: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str | os.PathLike] | None = None,
) -> Path:
    """Write ``model`` to the directory ``out`` (which must not exist yet), atomically."""
    out = Path(out)
    if out.exists():
        raise ArtifactError(f"{out} already exists; remove it or choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        # through open(), like dymu's store: save_file's files are 0600
        (tmp / WEIGHTS).write_bytes(
            save_bytes(state, metadata={"format": FORMAT, "kind": model.kind})
        )
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        cost = shared_cost(model.config)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": model.kind,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            **describe_baseline(model),
            "inference_cost": {
                **cost.to_dict(),
                "input_size": list(model.input_size),
                "flop_convention": "1 multiply-add = 2 FLOPs",
            },
            "control_params": model.control_params,
            "input_normalization": dict(input_normalization) if input_normalization else None,
            "training": dict(training or {}),
            "files": {p.name: file_entry(p) for p in sorted(tmp.iterdir())},
        }
        if isinstance(model, StaticMTL):
            manifest["r"] = list(model.r)
            manifest["train_seconds"] = model.train_seconds
            manifest["steps"] = manifest["training"].get("steps")
        else:
            manifest["train_seconds"] = manifest["training"].get("train_seconds")
            manifest["steps"] = manifest["training"].get("steps")
        write_manifest(tmp, manifest)
        os.rename(tmp, out)
        return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def describe_baseline(model: Baseline) -> dict[str, Any]:
    """The model config (as dymu's manifests hold it) and the generator's options."""
    return {**describe(model.config), "options": model.options.model_dump(mode="json")}


def save_static_set(out: Path, members: list[tuple[str, StaticMTL]]) -> Path:
    """Write ``out/manifest.json`` listing the member directories ``out/<name>``."""
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": STATIC_SET,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "members": [
            {
                "path": name,
                "r": list(m.r),
                "train_seconds": m.train_seconds,
                "steps": m.manifest.get("steps"),
            }
            for name, m in members
        ],
        "train_seconds": sum(m.train_seconds for _, m in members),
        "steps": sum(m.manifest.get("steps") or 0 for _, m in members),
        "control_params": 0,
        "files": {f"{name}/{MANIFEST}": file_entry(out / name / MANIFEST) for name, _ in members},
    }
    write_manifest(out, manifest)
    return out


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    """The verified baseline manifest of ``directory``, or None if it is not a baseline."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {manifest.get('format_version')!r}; "
            f"this dymu reads {FORMAT_VERSION}"
        )
    required = () if manifest.get("kind") == STATIC_SET else (WEIGHTS,)
    verify_artifact(directory, manifest, required)
    return manifest


def _load_baseline(directory: Path, manifest: dict[str, Any], device: torch.device) -> Baseline:
    kind = manifest.get("kind")
    if kind not in BASELINES:
        raise ArtifactError(f"{directory / MANIFEST}: unknown baseline kind {kind!r}")
    config = config_from_manifest(manifest, directory / MANIFEST)
    try:
        options = GeneratorOptions.model_validate(manifest.get("options", {}))
    except ValidationError as exc:
        raise ArtifactError(
            f"{directory / MANIFEST} has invalid generator options: "
            f"{validation_message(exc.errors())}"
        ) from exc
    cls = BASELINES[kind]
    model = cls(config, options, r=manifest.get("r")) if cls is StaticMTL else cls(config, options)
    try:
        model.load_state_dict(load_file(str(directory / WEIGHTS), device="cpu"), strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ArtifactError(
            f"{directory / WEIGHTS} does not fit the model: {str(exc).splitlines()[0]}"
        ) from exc
    if isinstance(model, StaticMTL):
        model.train_seconds = float(manifest.get("train_seconds") or 0.0)
    model.manifest = {**manifest, "path": str(directory)}
    return model.to(device).eval()


def load_method(path: str | os.PathLike, device: str | torch.device = "auto") -> Any:
    """Any method directory as a controllable-like object.

    A baseline directory (``RUN_DIR/phn``, ``RUN_DIR/static/k0``, ...), the static set
    (``RUN_DIR/static``: a :class:`StaticSet`), or a dymu artifact (``dymu.load``: a store
    directory or a version directory). Every checksum is verified first.
    """
    directory = Path(path)
    dev = resolve_device(device, error=ArtifactError)
    manifest = _read_manifest(directory) if directory.is_dir() else None
    if manifest is None:
        return dymu.load(directory, device=dev)
    if manifest["kind"] == STATIC_SET:
        members = []
        for entry in manifest["members"]:
            member = _read_manifest(directory / entry["path"])
            if member is None:
                raise ArtifactError(f"{directory / entry['path']} is not a baseline directory")
            members.append(_load_baseline(directory / entry["path"], member, dev))
        return StaticSet(members, {**manifest, "path": str(directory)})
    return _load_baseline(directory, manifest, dev)
