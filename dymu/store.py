"""The artifact store: versioned, checksummed model directories (safetensors + manifest.json).

Layout (``model_store/<name>/<version>/``, versions ``v1``, ``v2``, ...)::

    manifest.json               format, config (tasks, backbone, N, L, input size, hypernets),
                                task affinity, training record, metrics, sha256 of every file,
                                and manifest_sha256 over the rest of the manifest
    anchor.safetensors          the N single-task streams and heads
    edge_hypernet.safetensors   h: preference -> parent logits
    weight_hypernet.safetensors h-bar: preference -> BN deltas
    (extra files, e.g. train_log.csv, listed and checksummed like the rest)

Only safetensors is ever read (no pickle). A version directory appears by an atomic rename of a
fully written temporary directory, so a reader never sees half an artifact. :func:`load`
verifies every checksum before it builds anything and names the file that fails.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from .config import ModelConfig
from .device import resolve_device
from .errors import ArtifactError, validation_message
from .model import ControllableModel, describe

FORMAT = "dymu-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Component (attribute of :class:`ControllableModel`) -> weights file.
COMPONENTS = {
    "anchor": "anchor.safetensors",
    "edge_hypernet": "edge_hypernet.safetensors",
    "weight_hypernet": "weight_hypernet.safetensors",
}
_VERSION = re.compile(r"^v([1-9][0-9]*)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest without its own `manifest_sha256` entry (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """A manifest's ``files`` entry for ``path``: its sha256 and size (what
    :func:`verify_artifact` checks)."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Seal ``manifest`` with its ``manifest_sha256`` and write ``directory/manifest.json``
    durably (fsync'd, replaced atomically)."""
    manifest["manifest_sha256"] = manifest_digest(manifest)
    tmp = directory / f".{MANIFEST}.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def config_from_manifest(manifest: Mapping[str, Any], where: Path) -> ModelConfig:
    """The :class:`ModelConfig` a manifest describes (``describe(config)``'s fields);
    :class:`ArtifactError` naming ``where`` and the first bad field otherwise."""
    try:
        return ModelConfig.model_validate(
            {k: manifest[k] for k in ModelConfig.model_fields if k in manifest}
        )
    except ValidationError as exc:
        raise ArtifactError(
            f"{where} has an invalid model config: {validation_message(exc.errors())}"
        ) from exc


def list_versions(store_dir: str | os.PathLike) -> list[str]:
    """Versions under ``model_store/<name>``, oldest first."""
    root = Path(store_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p.name)
        for p in root.iterdir()
        if p.is_dir() and (m := _VERSION.match(p.name))
    ]
    return [name for _, name in sorted(found)]


def resolve(path: str | os.PathLike) -> Path:
    """A version directory: ``path`` itself if it holds a manifest, else its newest version."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    if not p.exists():
        raise ArtifactError(f"no model at {p}: the path does not exist")
    versions = list_versions(p)
    if not versions:
        raise ArtifactError(
            f"no model at {p}: no {MANIFEST} and no version directories (v1, v2, …)"
        )
    return p / versions[-1]


def read_manifest(version_dir: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The manifest of a version directory; with ``verify``, every checksum is checked first."""
    vdir = Path(version_dir)
    mpath = vdir / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"incomplete artifact {vdir}: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not a dymu artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath} has format_version {manifest.get('format_version')!r}; "
            f"this dymu reads {FORMAT_VERSION}"
        )
    if verify:
        verify_artifact(vdir, manifest)
    return manifest


def verify_artifact(
    version_dir: Path,
    manifest: Mapping[str, Any],
    required: Iterable[str] = tuple(COMPONENTS.values()),
) -> None:
    """Raise :class:`ArtifactError` naming the first missing, changed or unlisted file.

    ``required`` are the files the manifest must list (a dymu artifact's three components by
    default; other checksummed directories, e.g. the baselines', name their own).
    """
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise ArtifactError(
            f"{version_dir / MANIFEST} was modified after it was written "
            "(manifest_sha256 does not match)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{version_dir / MANIFEST} lists no files")
    for name in required:
        if name not in files:
            raise ArtifactError(f"incomplete artifact {version_dir}: {name} is not listed")
    for name, entry in files.items():
        path = version_dir / name
        if not path.is_file():
            raise ArtifactError(f"incomplete artifact {version_dir}: {name} is missing")
        if path.stat().st_size != entry.get("bytes"):
            raise ArtifactError(
                f"{path} has {path.stat().st_size} bytes, the manifest says "
                f"{entry.get('bytes')} (truncated or replaced)"
            )
        if sha256_file(path) != entry.get("sha256"):
            raise ArtifactError(f"{path} fails its sha256 check (tampered or corrupted)")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    model: ControllableModel,
    store_dir: str | os.PathLike,
    *,
    version: str | None = None,
    task_affinity: Any = None,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    input_normalization: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str | os.PathLike | bytes] | None = None,
) -> Path:
    """Write ``model`` as a new version under ``store_dir`` (``model_store/<name>``), atomically.

    ``version`` defaults to the next ``v<n>``. ``task_affinity`` is the N x N RSA affinity
    (paper App. D; docs/design.md §4); ``training`` records the command, data seed, wall time, etc.
    ``input_normalization`` = ``{"mean": [...], "std": [...]}`` of [0, 1] pixels, per input
    channel: how images must be normalized before the model sees them. Returns the version
    directory.
    """
    root = Path(store_dir)
    if not _NAME.match(root.name):
        raise ArtifactError(f"bad model name {root.name!r}: use letters, digits, '.', '_', '-'")
    if version is not None and not _VERSION.match(version):
        raise ArtifactError(f"bad version {version!r}: versions are v1, v2, …")
    n = model.n_tasks
    if task_affinity is not None:
        task_affinity = torch.as_tensor(task_affinity, dtype=torch.float64).tolist()
        if len(task_affinity) != n or any(len(row) != n for row in task_affinity):
            raise ArtifactError(f"task_affinity must be {n} x {n}")
    if input_normalization is not None:
        input_normalization = _check_normalization(input_normalization, model.config.in_channels)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        for attr, fname in COMPONENTS.items():
            state = {
                k: v.detach().to("cpu").contiguous()
                for k, v in getattr(model, attr).state_dict().items()
            }
            # Written through open() rather than save_file, whose files are 0600: an artifact
            # must be readable by the (non-root) server that mounts it (docs/service.md).
            (tmp / fname).write_bytes(
                save_bytes(state, metadata={"format": FORMAT, "component": attr})
            )
        for fname, src in (extra_files or {}).items():
            if Path(fname).name != fname or fname == MANIFEST or fname in COMPONENTS.values():
                raise ArtifactError(f"bad extra file name {fname!r}")
            if isinstance(src, bytes):
                (tmp / fname).write_bytes(src)
            else:
                shutil.copyfile(src, tmp / fname)
        for path in sorted(tmp.iterdir()):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            files[path.name] = file_entry(path)
        anchor = model.anchor_cost()
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": root.name,
            "version": None,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            **describe(model.config),
            "anchor_cost": {
                **anchor.to_dict(),
                "input_size": list(model.input_size),
                "flop_convention": "1 multiply-add = 2 FLOPs",
            },
            "control_params": model.control_params,
            "task_affinity": task_affinity,
            "input_normalization": input_normalization,
            "training": dict(training or {}),
            "metrics": dict(metrics or {}),
            "files": files,
        }
        return _publish(root, tmp, manifest, version)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_normalization(norm: Mapping[str, Any], channels: int) -> dict[str, list[float]]:
    try:
        out = {k: [float(v) for v in norm[k]] for k in ("mean", "std")}
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError("input_normalization needs numeric 'mean' and 'std' lists") from exc
    if any(len(v) != channels for v in out.values()) or min(out["std"]) <= 0:
        raise ArtifactError(f"input_normalization needs {channels} means and positive stds")
    return out


def _next_version(root: Path) -> str:
    versions = list_versions(root)
    return f"v{int(versions[-1][1:]) + 1}" if versions else "v1"


def _publish(root: Path, tmp: Path, manifest: dict[str, Any], version: str | None) -> Path:
    """Write the manifest and rename ``tmp`` into place; retry the next v<n> if one races us."""
    for _ in range(100):
        name = version or _next_version(root)
        manifest["version"] = name
        write_manifest(tmp, manifest)
        try:
            os.rename(tmp, root / name)
        except OSError as exc:
            if version is not None or not (root / name).exists():
                raise ArtifactError(f"cannot publish {root / name}: {exc}") from exc
            continue  # another writer took this version number
        _fsync_dir(root)
        return root / name
    raise ArtifactError(f"could not find a free version under {root}")


def load(path: str | os.PathLike, device: str | torch.device = "auto") -> ControllableModel:
    """Load and verify an artifact (a version directory, or ``model_store/<name>`` = newest).

    Every file's sha256 is checked before anything is built; the model is returned in eval
    mode on ``device`` ("auto" = CUDA when available, else CPU).
    """
    dev = resolve_device(device, error=ArtifactError)
    vdir = resolve(path)
    manifest = read_manifest(vdir, verify=True)
    config = config_from_manifest(manifest, vdir / MANIFEST)
    model = ControllableModel(config, manifest={**manifest, "path": str(vdir)})
    if (manifest.get("n_tasks"), manifest.get("n_layers")) != (model.n_tasks, model.n_layers):
        raise ArtifactError(f"{vdir / MANIFEST}: n_tasks/n_layers do not match its config")
    for attr, fname in COMPONENTS.items():
        try:
            state = load_file(str(vdir / fname), device="cpu")
            getattr(model, attr).load_state_dict(state, strict=True)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise ArtifactError(
                f"{vdir / fname} does not fit the model: {str(exc).splitlines()[0]}"
            ) from exc
    return model.to(dev).eval()
