#!/usr/bin/env bash
# Run the tests (and, if named, chapters) against the library versions of a Colab runtime.
#
#   tools/test_versions.sh colab-current                       # the unit tests
#   tools/test_versions.sh colab-previous tests/test_clip.py   # any pytest arguments
#   tools/test_versions.sh colab-previous --nbmake chapters/03_clip.ipynb --nbmake-timeout=1200
#
# Builds .venvs/NAME on first use (again when the pins below change), with torch, the pinned references
# and what the tests and nbmake need, installs ldm_teach from the working tree (editable), prints the
# versions it ended up with, then runs pytest offline in the quick profile (default arguments: tests).
#
# Python: Colab runs 3.13 (current) and 3.12 (previous). On the project's machines the CPU build of
# torch 2.13.0 exists only for Python 3.11 (PyPI's 3.12 and 3.13 wheels for Linux are the CUDA build,
# several GB with its nvidia packages), so the default is python3.11; PYTHON=python3.13 picks another
# interpreter where a torch for it can be had, TORCH another torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."

name=${1:-}
case "$name" in
  colab-current)   # Colab's runtime since 2026-08 (Python 3.13 there)
    pins=(diffusers==0.39.0 transformers==5.15.0 numpy==2.1.3 huggingface_hub==1.27.0 peft==0.21.2) ;;
  colab-previous)  # Colab's 2026.01 runtime (Python 3.12 there)
    pins=(diffusers==0.36.0 transformers==4.57.6 numpy==2.0.2 peft==0.21.2) ;;
  *)
    echo "usage: $0 colab-current|colab-previous [pytest arguments, default: tests]" >&2
    exit 2 ;;
esac
shift
PYTHON=${PYTHON:-python3.11}
TORCH=${TORCH:-torch==2.13.0}
# What the tests and `pytest --nbmake` need besides the pins (pyyaml: tools/build_book.py, which
# tests/test_book.py imports; django-static-mathjax, whose files tests/test_book.py checks are served with
# the book, pinned as in requirements.txt); not jupyter-book, which only the book build needs.
tools=(accelerate pytest pyyaml nbmake ipykernel "$(grep -m1 "^django-static-mathjax" requirements.txt)")

venv=.venvs/$name
spec="$("$PYTHON" --version 2>&1) $TORCH ${pins[*]} ${tools[*]}"
if [[ ! -f $venv/.spec || "$(cat "$venv/.spec")" != "$spec" ]]; then
  echo "== building $venv: $spec"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  log=$venv/build.log
  {
    "$venv/bin/python" -m pip install --upgrade pip &&
    "$venv/bin/python" -m pip install "$TORCH" &&
    # torch repeated so that nothing the pins pull in replaces it
    "$venv/bin/python" -m pip install "$TORCH" "${pins[@]}" "${tools[@]}" -e .
  } > "$log" 2>&1 || { tail -n 30 "$log"; echo "== building $venv failed; the whole log: $log" >&2; exit 1; }
  echo "$spec" > "$venv/.spec"
fi

"$venv/bin/python" - <<'PY'
import importlib.metadata as md, platform
names = ["torch", "diffusers", "transformers", "tokenizers", "numpy", "huggingface_hub", "safetensors", "accelerate"]
print("== python", platform.python_version(), "|", ", ".join(f"{n} {md.version(n)}" for n in names))
PY
export HF_HUB_OFFLINE=1 LDM_TEACH_PROFILE=${LDM_TEACH_PROFILE:-quick}
if [[ $# -eq 0 ]]; then set -- tests; fi
exec "$venv/bin/python" -m pytest "$@"
