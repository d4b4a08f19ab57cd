#!/usr/bin/env bash
# The full benchmark suite on a CUDA machine that has nothing but a copy of this repository.
#
#   benchmarks/gpu.sh OUTDIR [dymu bench options]   # e.g. --quick, --cases backends server
#   benchmarks/gpu.sh --fetch-wheels                 # once, where pip can reach the registry
#
# The lent GPU machines have python3 (3.12) with torch >= 2.11 + CUDA, numpy, onnx, onnxruntime
# (CPU), Pillow, httpx and prometheus-client, but not pydantic, FastAPI or uvicorn. Those
# travel as wheels in .whl/ (--fetch-wheels downloads them, 3 MB; .gitignore keeps them out of
# git; with the device tool, name .whl in `carry`) and are installed with --no-deps into a
# private folder: nothing of the machine's own environment, torch above all, is replaced. dymu
# itself runs from the checkout (PYTHONPATH), so no build step is needed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${DYMU_WHEELS:-$ROOT/.whl}"
SITE="${DYMU_SITE:-/tmp/dymu-site}"

# pydantic and the serving stack for CPython 3.12 on manylinux x86-64, the versions this
# repository is tested with. onnxruntime-gpu (about 300 MB) is over the 64 MiB that travels to a
# lent machine, so it is fetched only with DYMU_ORT_GPU=1; without it the ONNX variants run on
# the image's own onnxruntime (CPU execution provider), and the results say which provider ran.
WHEEL_SPECS=(
  "pydantic==2.14.3" "pydantic-core==2.50.4" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "typing-extensions==4.16.0" "pydantic-settings==2.16.3" "python-dotenv==1.2.4"
  "fastapi==0.165.0" "starlette==1.10.0" "annotated-doc==0.0.7" "uvicorn==0.54.0"
  "python-multipart==0.0.34"
)
[[ "${DYMU_ORT_GPU:-0}" == 1 ]] && WHEEL_SPECS+=("onnxruntime-gpu==1.31.1")

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$WHEELS"
  for spec in "${WHEEL_SPECS[@]}"; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
      -d "$WHEELS" "$spec"
  done
  ls -l "$WHEELS"
  exit 0
fi

OUT="${1:?usage: benchmarks/gpu.sh OUTDIR [dymu bench options] | benchmarks/gpu.sh --fetch-wheels}"
shift
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

# What the machine is, next to the results (the harness records versions and device too).
{
  if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1; else echo "no nvidia-smi"; fi
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
  "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
    2>&1 || echo "onnxruntime: not importable (ONNX variants are skipped)"
} >"$OUT/environment.txt"
cat "$OUT/environment.txt"

DEVICE=cuda
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || DEVICE=cpu
# Later options win: `gpu.sh OUT --device cpu` runs the same script on a CPU (a dry run).
"$PY" -m benchmarks --out "$OUT" --device "$DEVICE" "$@" 2>&1 | tee "$OUT/bench.log"
exit "${PIPESTATUS[0]}"
