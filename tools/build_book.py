"""Build the book with Sphinx warnings as errors: `python tools/build_book.py [--student] [--from-outputs]`.

Without options this is `jupyter-book build . -W`, executing each chapter (results cached in
_build/.jupyter_cache). `--student` hides every solution (the edition to give students),
into _build/student. `--from-outputs` does not execute: it renders the outputs already in the
notebooks (CI runs the chapters once, under nbmake, and builds from what they wrote).
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", action="store_true", help="leave the solutions out")
    parser.add_argument("--from-outputs", action="store_true", help="render stored outputs, do not execute")
    args = parser.parse_args()

    jupyter_book = pathlib.Path(sys.executable).with_name("jupyter-book")  # the CLI beside this Python
    command = [str(jupyter_book), "build", str(ROOT), "-W", "--keep-going"]
    if args.student or args.from_outputs:
        config = yaml.safe_load((ROOT / "_config.yml").read_text())
        if args.student:
            config["sphinx"]["config"]["hide_solutions"] = True
            config["execute"]["cache"] = str(ROOT / "_build" / ".jupyter_cache")  # reuse the main build's runs
            command += ["--path-output", str(ROOT / "_build" / "student")]
        if args.from_outputs:
            config["execute"]["execute_notebooks"] = "off"
        derived = ROOT / "_build" / "_config.derived.yml"
        derived.parent.mkdir(exist_ok=True)
        derived.write_text(yaml.safe_dump(config, sort_keys=False))
        command += ["--config", str(derived)]
    print("$", " ".join(command), flush=True)
    return subprocess.call(command, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
