"""Pass this machine's pip configuration into `docker build` (docker/Dockerfile's PIP_CONF).

On machines where pip finds packages through its own configuration (a wheel directory with the
CPU torch build, a CA bundle for a TLS-intercepting proxy) and the public PyTorch index cannot
be reached, the image is built with that configuration: this script writes docker/pip/ (git
ignored, in the build context) with a pip.conf whose paths point into the build's copy,
/tmp/pip/, and copies the files it names: the CA bundle, the local wheel directories (hard
links when possible) and the constraints file. Index URLs that are local directories (file://)
are dropped: they do not exist inside the build.

    python docker/bases/pip_context.py      # then: docker build --build-arg PIP_CONF=pip.conf
                                            #         --build-arg TORCH_INDEX= ...
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docker" / "pip"
INSIDE = Path("/tmp/pip")  # where docker/Dockerfile copies docker/pip/
KEEP = {"README.md", ".gitignore"}


def pip_config() -> dict[str, str]:
    """pip's effective settings (files, then PIP_* variables): {"find-links": ..., ...}."""
    text = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    config: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        config[key.rpartition(".")[2]] = value.strip().strip("'\"")
    for name, value in os.environ.items():
        if name.startswith("PIP_"):
            config[name[4:].lower().replace("_", "-")] = value
    return config


def copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def write_context(config: dict[str, str]) -> list[str]:
    """docker/pip/ for ``config``; the lines of its pip.conf."""
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():  # what an earlier run wrote; the tracked README stays
        if old.name not in KEEP:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    lines = ["[global]"]
    if cert := config.get("cert"):
        copy(Path(cert), OUT / "ca-bundle.crt")
        lines.append(f"cert = {INSIDE / 'ca-bundle.crt'}")
    links = []
    for i, entry in enumerate(config.get("find-links", "").split()):
        folder = Path(entry.removeprefix("file://"))
        if folder.is_dir():
            for wheel in sorted(folder.glob("*.whl")):
                copy(wheel, OUT / f"wheels{i}" / wheel.name)
            links.append(str(INSIDE / f"wheels{i}"))
        elif "://" in entry:
            links.append(entry)
    if links:
        lines.append("find-links = " + " ".join(links))
    if (constraint := config.get("constraint")) and Path(constraint).is_file():
        copy(Path(constraint), OUT / "constraints.txt")
        lines.append(f"constraint = {INSIDE / 'constraints.txt'}")
    for key in ("index-url", "extra-index-url", "trusted-host", "proxy", "default-timeout"):
        values = [v for v in config.get(key, "").split() if not v.startswith("file:")]
        if values:
            lines.append(f"{key} = {' '.join(values)}")
    (OUT / "pip.conf").write_text("\n".join(lines) + "\n")
    return lines


def main() -> None:
    lines = write_context(pip_config())
    print("docker-bases: docker/pip/pip.conf (this machine's pip configuration for the build):")
    print("\n".join("  " + line for line in lines))


if __name__ == "__main__":
    main()
