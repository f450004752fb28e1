"""The book's structure: every chapter in the table of contents exists, starts with the shared
setup cell, and is committed without outputs."""
import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import sync_setup_cell  # noqa: E402

TOC_FILES = re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text())
NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))


def test_every_toc_entry_exists():
    for entry in TOC_FILES + [re.search(r"root:\s*(\S+)", (ROOT / "_toc.yml").read_text()).group(1)]:
        assert any((ROOT / f"{entry}{suffix}").is_file() for suffix in (".ipynb", ".md")), entry


def test_every_chapter_notebook_is_in_the_toc():
    assert {f"chapters/{p.stem}" for p in NOTEBOOKS} <= set(TOC_FILES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_starts_with_the_setup_cell(path):
    first = json.loads(path.read_text())["cells"][0]
    assert "".join(first["source"]) == sync_setup_cell.setup_cell_source(), (
        f"{path.name}: the first cell is not the shared setup cell; run `python tools/sync_setup_cell.py`.")
    assert sync_setup_cell.repository_url() in "".join(first["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_budgets_follow_rt_budgets_and_gpu_sections_test_gpu_or_rehearsal(path):
    """A rehearsal (LDM_TEACH_PROFILE=full LDM_TEACH_BUDGETS=quick) runs the full profile's code with the quick
    budgets: a budget looked up by ``rt.profile`` would print the full budgets' numbers beside quick-budget
    models, and a GPU-only section that tests ``rt.device`` itself would never be rehearsed."""
    for cell in json.loads(path.read_text())["cells"]:
        source = "".join(cell["source"]) if cell["cell_type"] == "code" else ""
        assert not re.search(r"BUDGETS\[rt\.profile\]", source), f"{path.name}: use BUDGETS[rt.budgets]"
        assert not re.search(r"rt\.profile == .full. and rt\.device", source), (
            f"{path.name}: test rt.gpu_or_rehearsal for a GPU-only section")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_is_committed_without_outputs(path):
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert not cell["outputs"] and cell["execution_count"] is None, f"{path.name}: clear the outputs"


def test_student_edition_cuts_out_solutions_and_keeps_exercises():
    import build_book

    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text())
        stripped = build_book.strip_solutions(notebook)
        text = "".join("".join(cell["source"]) for cell in stripped["cells"])
        assert "solution-start" not in text and "solution-end" not in text, path.name
        exercises = "".join("".join(c["source"]) for c in notebook["cells"]).count("{exercise}")
        assert text.count("{exercise}") == exercises, path.name
        if "solution-start" in "".join("".join(c["source"]) for c in notebook["cells"]):
            assert len(stripped["cells"]) < len(notebook["cells"]), path.name
    example = {"cells": [
        {"cell_type": "markdown", "source": [":::{exercise} E\n:label: e\ntask\n:::\n\n```{solution-start} e\n:class: dropdown\n```\n"]},
        {"cell_type": "code", "source": ["answer = 42\n"]},
        {"cell_type": "markdown", "source": ["```{solution-end}\n```\n\nnext text\n"]},
    ]}
    kept = build_book.strip_solutions(example)["cells"]
    assert [c["cell_type"] for c in kept] == ["markdown", "markdown"]
    assert "task" in kept[0]["source"] and "answer" not in json.dumps(kept) and kept[1]["source"] == "next text\n"


def test_math_is_served_with_the_book(tmp_path):
    """MathJax comes from the book's own files (no CDN): the config points into _static, and the files it
    loads are copied there from the installed wheel."""
    import build_book
    import yaml

    mathjax_path = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["config"]["mathjax_path"]
    assert not mathjax_path.startswith(("http:", "https:", "//")), mathjax_path
    build_book.vendor_mathjax(tmp_path)
    assert (tmp_path / "_static" / mathjax_path).is_file()
    fonts = list((tmp_path / "_static" / "mathjax" / "es5" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert len(fonts) > 10 and (tmp_path / "_static" / "mathjax" / "LICENSE").is_file()


def _auto_graded():
    from ldm_teach.exercises import registry

    return [exercise for exercise in registry.EXERCISES if exercise.auto_graded]


@pytest.mark.parametrize("exercise", _auto_graded(), ids=lambda exercise: exercise.label)
def test_the_answer_is_not_on_the_page_before_the_exercise_nor_in_the_student_edition(exercise):
    import build_book

    notebook = json.loads((ROOT / "chapters" / f"{exercise.chapter}.ipynb").read_text())
    sources = ["".join(cell["source"]) for cell in notebook["cells"]]
    position = next(i for i, source in enumerate(sources) if f":label: {exercise.label}\n" in source)
    student = [("".join(cell["source"]), cell["cell_type"]) for cell in build_book.strip_solutions(notebook)["cells"]]
    student_code = [source for source, kind in student if kind == "code"]
    definition = re.compile(rf"^def {re.escape(exercise.function)}\(", re.M)
    stubs = [source for source in student_code if definition.search(source)]
    assert len(stubs) == 1 and "replace with your code" in stubs[0], exercise.label  # the starting code only
    assert f"exercises.{exercise.checker}({exercise.function})" in stubs[0]
    for shown in exercise.sources:
        call = f"show_source({shown})"
        assert not any(call in source for source in sources[:position]), f"{shown} is shown before {exercise.label}"
        assert any(call in source for source in sources[position:]), f"{shown} is not shown after {exercise.label}"
        assert not any(call in source for source in student_code), f"the student edition shows {shown}"


def test_the_student_edition_leaves_out_the_instructors_page():
    import build_book
    import yaml

    toc = build_book.student_toc(yaml.safe_load((ROOT / "_toc.yml").read_text()))
    files = [chapter["file"] for part in toc["parts"] for chapter in part["chapters"]]
    assert "chapters/instructors" in TOC_FILES and "chapters/instructors" not in files
    assert [f for f in TOC_FILES if f != "chapters/instructors"] == files
