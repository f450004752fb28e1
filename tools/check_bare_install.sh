#!/usr/bin/env bash
# What Colab does, minus the network: in a fresh venv that holds only torch, `pip install .` and
# import every ldm_teach module, with neither diffusers nor transformers installed.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-torch==2.13.0}
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "$TORCH"
"$venv/bin/python" -m pip install --quiet .
cd "$(mktemp -d)"  # import the installed package, not the source tree
"$venv/bin/python" - <<'PY'
import importlib, pkgutil
import ldm_teach
for name in ("diffusers", "transformers"):
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is installed in the bare venv; this check needs it absent")
modules = sorted(m.name for m in pkgutil.iter_modules(ldm_teach.__path__))
for name in modules:
    importlib.import_module(f"ldm_teach.{name}")
from ldm_teach.clip import Tokenizer
assert Tokenizer()(["a photo of a cat"]).shape == (1, 77)  # the bundled vocabulary was installed
print(f"bare install: imported {len(modules)} modules without diffusers or transformers: {', '.join(modules)}")
PY
rm -rf "$(dirname "$venv")"
