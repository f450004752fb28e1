"""Build the book with Sphinx warnings as errors: `python tools/build_book.py [--student] [--from-outputs]`.

Without options this is `jupyter-book build . -W`, executing each chapter (results cached in
_build/.jupyter_cache). `--student` builds the edition to give students, into _build/student: a
copy of the book whose chapters have every solution block (the gated `solution-start` ...
`solution-end` cells) cut out, so neither the solutions' text nor their code reaches the page, and
without the instructors' page (its sample grading holds answers).
`--from-outputs` does not execute: it renders the outputs already in the notebooks (CI runs the
chapters once, under nbmake, and builds from what they wrote).

Math renders without a network: MathJax's files (from the django-static-mathjax wheel, which holds
MathJax 3 and nothing of Django) are copied into the built book's _static/mathjax after the build
(not into the source's _static, whose every .js file jupyter-book would load on every page).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOLUTION_START = re.compile(r"```\{solution-start\}[^\n]*\n(?::[^\n]*\n)*```[^\n]*\n?")
SOLUTION_END = re.compile(r"```\{solution-end\}[^\n]*\n```[^\n]*\n?")


def strip_solutions(notebook: dict) -> dict:
    """The notebook without its solutions: from each `solution-start` fence to its `solution-end`
    fence, markdown and code cells alike, keeping any text around the fences."""
    cells, inside = [], False
    for cell in notebook["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            kept = ""
            while source:
                if inside:
                    end = SOLUTION_END.search(source)
                    if not end:
                        source = ""
                        break
                    source, inside = source[end.end():], False
                else:
                    start = SOLUTION_START.search(source)
                    if not start:
                        kept, source = kept + source, ""
                        break
                    kept, source, inside = kept + source[:start.start()], source[start.end():], True
            if kept.strip():
                cells.append({**cell, "source": kept.strip() + "\n"})
        elif not inside:
            cells.append(cell)
    return {**notebook, "cells": cells}


MATHJAX_FILES = ("LICENSE", "es5/tex-chtml.js", "es5/output/chtml/fonts/woff-v2", "es5/input/tex/extensions",
                 "es5/ui/menu.js", "es5/a11y")


def vendor_mathjax(html: pathlib.Path) -> None:
    """Copy what MathJax 3's ``tex-chtml`` component loads (itself, its fonts, the TeX extensions it may
    autoload, the menu's accessibility parts) into the built book's _static/mathjax, where
    ``mathjax_path`` points."""
    import importlib.util

    spec = importlib.util.find_spec("mathjax")
    if spec is None:
        raise SystemExit("MathJax's files are missing: pip install -r requirements.txt (django-static-mathjax).")
    source = pathlib.Path(spec.submodule_search_locations[0]) / "static" / "mathjax"
    target = html / "_static" / "mathjax"
    shutil.rmtree(target, ignore_errors=True)
    for name in MATHJAX_FILES:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name)
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, target / name)


INSTRUCTORS_ONLY = {"chapters/instructors"}  # pages left out of the student edition (the grading page grades answers)


def student_toc(toc: dict) -> dict:
    """The table of contents without the instructors' pages (and without parts left empty)."""
    parts = []
    for part in toc.get("parts", []):
        chapters = [chapter for chapter in part.get("chapters", []) if chapter.get("file") not in INSTRUCTORS_ONLY]
        if chapters:
            parts.append({**part, "chapters": chapters})
    return {**toc, "parts": parts}


def student_copy(config: dict) -> pathlib.Path:
    """A copy of the book in _build/student_src with the solutions cut out of every chapter and
    the instructors' pages left out."""
    source = ROOT / "_build" / "student_src"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(ROOT / "chapters", source / "chapters")
    shutil.copytree(ROOT / "_static", source / "_static")
    for page in INSTRUCTORS_ONLY:
        for path in source.glob(f"{page}.*"):
            path.unlink()
    toc = student_toc(yaml.safe_load((ROOT / "_toc.yml").read_text()))
    (source / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    for path in (source / "chapters").glob("*.ipynb"):
        path.write_text(json.dumps(strip_solutions(json.loads(path.read_text())), indent=1, ensure_ascii=False))
    config["sphinx"]["config"]["hide_solutions"] = True
    (source / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", action="store_true", help="leave the solutions out")
    parser.add_argument("--from-outputs", action="store_true", help="render stored outputs, do not execute")
    args = parser.parse_args()

    jupyter_book = pathlib.Path(sys.executable).with_name("jupyter-book")  # the CLI beside this Python
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    if args.from_outputs:
        config["execute"]["execute_notebooks"] = "off"
    book = ROOT
    command = [str(jupyter_book), "build", "-W", "--keep-going"]
    html = ROOT / "_build" / "html"
    if args.student:
        book = student_copy(config)
        command += ["--path-output", str(ROOT / "_build" / "student")]
        html = ROOT / "_build" / "student" / "_build" / "html"
    elif args.from_outputs:
        derived = ROOT / "_build" / "_config.derived.yml"
        derived.parent.mkdir(exist_ok=True)
        derived.write_text(yaml.safe_dump(config, sort_keys=False))
        command += ["--config", str(derived)]
    command.append(str(book))
    print("$", " ".join(command), flush=True)
    status = subprocess.call(command, cwd=book)
    if status == 0:
        vendor_mathjax(html)
    return status


if __name__ == "__main__":
    sys.exit(main())
