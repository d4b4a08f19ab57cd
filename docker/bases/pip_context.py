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
    """A hard link (a copy across file systems); left alone when it is already that file, so
    that the build's layer cache stays valid from one run to the next."""
    if dest.exists() and (dest.samefile(src) or dest.read_bytes() == src.read_bytes()):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def write_context(config: dict[str, str]) -> list[str]:
    """docker/pip/ for ``config``; the lines of its pip.conf."""
    OUT.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}  # name in docker/pip/ -> the file it copies
    lines = ["[global]"]
    if cert := config.get("cert"):
        files["ca-bundle.crt"] = Path(cert)
        lines.append(f"cert = {INSIDE / 'ca-bundle.crt'}")
    links = []
    for i, entry in enumerate(config.get("find-links", "").split()):
        folder = Path(entry.removeprefix("file://"))
        if folder.is_dir():
            files.update({f"wheels{i}/{w.name}": w for w in sorted(folder.glob("*.whl"))})
            links.append(str(INSIDE / f"wheels{i}"))
        elif "://" in entry:
            links.append(entry)
    if links:
        lines.append("find-links = " + " ".join(links))
    if (constraint := config.get("constraint")) and Path(constraint).is_file():
        files["constraints.txt"] = Path(constraint)
        lines.append(f"constraint = {INSIDE / 'constraints.txt'}")
    for key in ("index-url", "extra-index-url", "trusted-host", "proxy", "default-timeout"):
        values = [v for v in config.get(key, "").split() if not v.startswith("file:")]
        if values:
            lines.append(f"{key} = {' '.join(values)}")
    for old in sorted(OUT.rglob("*"), reverse=True):  # what an earlier run wrote, if stale
        name = old.relative_to(OUT).as_posix()
        if old.is_file() and name not in files and name not in KEEP | {"pip.conf"}:
            old.unlink()
        elif old.is_dir() and not any(old.iterdir()):
            old.rmdir()
    for name, src in files.items():
        copy(src, OUT / name)
    text = "\n".join(lines) + "\n"
    conf = OUT / "pip.conf"
    if not conf.exists() or conf.read_text() != text:
        conf.write_text(text)
    return lines


def main() -> None:
    lines = write_context(pip_config())
    print("docker-bases: docker/pip/pip.conf (this machine's pip configuration for the build):")
    print("\n".join("  " + line for line in lines))


if __name__ == "__main__":
    main()
