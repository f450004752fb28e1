"""Grade submitted chapter notebooks: ``python -m ldm_teach.grade SUBMISSION.ipynb ... --csv grades.csv``.

Each submission runs in its own fresh Jupyter kernel (nbclient), offline (``HF_HUB_OFFLINE=1``), in
the quick profile, with matplotlib drawing off screen. The grade of an exercise comes from the
grader calling that exercise's checker itself, in that kernel, on the function the student
defined, with a seed the student did not see (``--seed``, random unless given). What the notebook
printed, its own checker calls included, is never read.

Which cells run. A whole chapter takes minutes (chapter 05 trains a model), and the exercises'
functions never need that state. So the grader runs, in the notebook's order and each as a cell of
its own, continuing past errors:

- every *definition cell*: a code cell whose top-level statements are only imports, function and
  class definitions (a student's helper functions live there);
- every *answer cell*: a code cell that defines, at top level, the function an exercise of this
  chapter asks for (``registry``), whole, so that a cell failing after its ``def`` still defines it;
- of every other code cell, its import statements only (the chapter's imports cell usually does more
  than import: ``tokenizer = clip.Tokenizer()``).

The submission's cells share one time limit (``--timeout``); each check gets its own
(``--check-timeout``), so a function that loops forever fails its exercise and no other. A timed-out
cell is interrupted and the grading goes on. Exercises whose function is missing, is not callable,
raises inside the checker or times out fail with that reason.

The chapter of a submission is read from the exercise labels in its Markdown (``:label: ex-...``),
or given with ``--chapter``. The CSV has one row per submission and auto-graded exercise and a
``total`` row per submission; its columns follow nbgrader's export (``student_id``, ``assignment``,
``score``/``max_score`` there are ``points``/``max_points`` here): file, student_id, assignment,
label, passed, points, max_points, message (the first line of the checker's verdict).
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import pathlib
import re
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field

from .exercises import registry

COLUMNS = ["file", "student_id", "assignment", "label", "passed", "points", "max_points", "message"]
LABEL = re.compile(r":label:\s*(ex-[\w-]+)")


@dataclass
class Grade:
    """One exercise of one submission."""
    label: str
    passed: bool
    points: float
    max_points: float
    message: str


@dataclass
class Submission:
    """One graded notebook: its grades, the cells the grader ran and how they went."""
    file: str
    assignment: str
    seed: int
    grades: list[Grade] = field(default_factory=list)
    cells: list[dict] = field(default_factory=list)  # index in the notebook, role, status
    seconds: float = 0.0

    @property
    def points(self) -> float:
        return sum(grade.points for grade in self.grades)

    @property
    def max_points(self) -> float:
        return sum(grade.max_points for grade in self.grades)


def chapter_of(notebook: dict) -> str:
    """The chapter (notebook stem) most of the notebook's exercise labels belong to."""
    counts: dict[str, int] = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "markdown":
            for label in LABEL.findall("".join(cell["source"])):
                if label in registry.BY_LABEL:
                    chapter = registry.BY_LABEL[label].chapter
                    counts[chapter] = counts.get(chapter, 0) + 1
    if not counts:
        raise ValueError("no exercise labels (`:label: ex-...`) of the book in this notebook; pass --chapter")
    return max(counts, key=counts.get)


def _python_source(source: str) -> str:
    """A cell's source as plain Python (IPython's ``%magics`` and ``!shell`` lines rewritten)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def plan_cells(notebook: dict, functions: set[str]) -> list[tuple[int, str, str]]:
    """The (notebook index, role, source) of every cell the grader runs, in the notebook's order;
    roles: "definitions", "answer" (defines one of ``functions``), "imports" (a cell's import lines)."""
    plan = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        try:
            python = _python_source(source)
            tree = ast.parse(python)
        except SyntaxError:  # run it anyway if it names an exercise's function: the kernel reports the error
            if any(re.search(rf"^def {re.escape(name)}\s*\(", source, re.M) for name in functions):
                plan.append((index, "answer", source))
            continue
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        only_definitions = all(isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.ClassDef)) for node in tree.body)
        if defined & functions:
            plan.append((index, "answer", source))
        elif only_definitions and tree.body:
            plan.append((index, "definitions", source))
        else:
            imports = [ast.get_source_segment(python, node) for node in tree.body
                       if isinstance(node, (ast.Import, ast.ImportFrom))]
            if imports:
                plan.append((index, "imports", "\n".join(imports)))
    return plan


PREAMBLE = """\
import os, sys
os.environ.setdefault("MPLBACKEND", "Agg")
import matplotlib
matplotlib.use("Agg")
"""

CHECK = """\
def _ldm_teach_check(label, function, checker, seed, limit, token):
    import contextlib, io, json
    from ldm_teach import exercises
    namespace = globals()
    if function not in namespace:
        result = dict(passed=False, message=f"no function `{function}` is defined: the cell that defines it "
                                            f"did not run or raised before its `def`")
    elif not callable(namespace[function]):
        result = dict(passed=False, message=f"`{function}` is a {type(namespace[function]).__name__}, not a function")
    else:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                verdict = getattr(exercises, checker)(namespace[function], seed=seed)
            result = dict(passed=bool(verdict), message=str(getattr(verdict, "message", verdict)))
        except KeyboardInterrupt:  # the grader interrupts a check that runs past its time limit
            result = dict(passed=False, message=f"the check did not finish within {limit:g} s (an endless loop?)")
        except BaseException as error:  # the checker ran the student's code: report whatever it raised
            result = dict(passed=False, message=f"the check crashed: {type(error).__name__}: {error}")
    print(token + json.dumps(dict(label=label, **result)))
"""


def _stream_text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.get("output_type") == "stream")


def _error_of(cell) -> str | None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return f"{output.get('ename')}: {output.get('evalue')}"
    return None


def grade_notebook(path: str | os.PathLike, seed: int, timeout: float = 120, check_timeout: float = 60,
                   chapter: str | None = None) -> Submission:
    """Grade one submission in a fresh kernel; see the module's docstring for what runs."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    start = time.perf_counter()
    path = pathlib.Path(path)
    source_notebook = json.loads(path.read_text(encoding="utf-8"))
    chapter = chapter or chapter_of(source_notebook)
    exercises = registry.for_chapter(chapter, auto_graded=True)
    if not exercises:
        raise ValueError(f"chapter {chapter!r} has no auto-graded exercises")
    submission = Submission(str(path), exercises[0].chapter, seed)
    plan = plan_cells(source_notebook, {exercise.function for exercise in exercises})
    token = f"@@ldm-teach-grade-{secrets.token_hex(8)}@@"

    cells = [nbformat.v4.new_code_cell(PREAMBLE)]
    cells += [nbformat.v4.new_code_cell(source) for _, _, source in plan]
    checks = [nbformat.v4.new_code_cell(CHECK + f"_ldm_teach_check({exercise.label!r}, {exercise.function!r}, "
                                                f"{exercise.checker!r}, {seed}, {check_timeout!r}, {token!r})")
              for exercise in exercises]
    notebook = nbformat.v4.new_notebook(cells=cells + checks)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}

    environment = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "LDM_TEACH_PROFILE": os.environ.get("LDM_TEACH_PROFILE", "quick"), "MPLBACKEND": "Agg"}
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)  # the kernel inherits the grader's environment
    client = NotebookClient(notebook, timeout=timeout, allow_errors=True, interrupt_on_timeout=True,
                            kernel_name="python3", resources={"metadata": {"path": str(path.parent.resolve())}})
    results: dict[str, dict] = {}
    try:
        with client.setup_kernel():
            deadline = time.perf_counter() + timeout
            client.timeout = 30  # the preamble
            client.execute_cell(notebook.cells[0], 0)
            for offset, (index, role, _) in enumerate(plan, start=1):
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    submission.cells.append(dict(index=index, role=role, status="not run: the time limit was reached"))
                    continue
                client.timeout = max(1, int(remaining))
                cell = notebook.cells[offset]
                try:
                    client.execute_cell(cell, offset)
                    error = _error_of(cell)
                except CellTimeoutError:
                    error = f"stopped after the submission's time limit of {timeout:g} s"
                status = "ok" if error is None else f"error: {error}"
                if error and ("KeyboardInterrupt" in error or "interrupt" in error.lower()):
                    status = f"stopped: the submission's time limit of {timeout:g} s was reached"
                submission.cells.append(dict(index=index, role=role, status=status))
            for offset, (exercise, cell) in enumerate(zip(exercises, checks), start=len(plan) + 1):
                client.timeout = max(1, int(check_timeout))
                try:
                    client.execute_cell(cell, offset)
                except CellTimeoutError:
                    pass
                line = next((line for line in _stream_text(cell).splitlines() if line.startswith(token)), None)
                if line is not None:
                    results[exercise.label] = json.loads(line[len(token):])
                elif _error_of(cell) and "KeyboardInterrupt" not in _error_of(cell):
                    results[exercise.label] = dict(passed=False, message=f"the check failed: {_error_of(cell)}")
                else:
                    results[exercise.label] = dict(passed=False, message=f"the check did not finish within "
                                                                         f"{check_timeout:g} s (an endless loop?)")
    except DeadKernelError as error:
        for exercise in exercises:
            results.setdefault(exercise.label, dict(passed=False, message=f"the kernel died: {error}"))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    errors = {cell["index"]: cell["status"] for cell in submission.cells if cell["status"] != "ok"}
    answer_cells = {index: source for index, role, source in plan if role == "answer"}
    for exercise in exercises:
        result = results.get(exercise.label, dict(passed=False, message="not checked"))
        message = result["message"]
        if not result["passed"] and message.startswith("no function"):
            where = [i for i, source in answer_cells.items() if re.search(rf"def {re.escape(exercise.function)}\b", source)]
            if not where:
                message += f"; no code cell of the notebook defines `{exercise.function}`"
            else:
                message += f"; cell {where[-1]}: {errors.get(where[-1], 'ran')}"
        submission.grades.append(Grade(exercise.label, bool(result["passed"]),
                                       exercise.points if result["passed"] else 0, exercise.points, message))
    submission.seconds = time.perf_counter() - start
    return submission


def rows(submissions: list[Submission]) -> list[dict]:
    """The CSV's rows: one per submission and exercise, then the submission's total."""
    table = []
    for submission in submissions:
        common = dict(file=submission.file, student_id=pathlib.Path(submission.file).stem,
                      assignment=submission.assignment)
        for grade in submission.grades:
            table.append(dict(common, label=grade.label, passed=int(grade.passed), points=grade.points,
                              max_points=grade.max_points, message=grade.message.splitlines()[0] if grade.message else ""))
        passed = sum(grade.passed for grade in submission.grades)
        table.append(dict(common, label="total", passed=int(passed == len(submission.grades)),
                          points=submission.points, max_points=submission.max_points,
                          message=f"{passed} of {len(submission.grades)} exercises passed"))
    return table


def write_csv(submissions: list[Submission], path: str | os.PathLike) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows(submissions))


def write_json(submissions: list[Submission], path: str | os.PathLike) -> None:
    pathlib.Path(path).write_text(json.dumps([dict(asdict(submission), points=submission.points,
                                                   max_points=submission.max_points) for submission in submissions],
                                             indent=1, ensure_ascii=False), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_teach.grade", description=__doc__.splitlines()[0])
    parser.add_argument("submissions", nargs="+", help="the submitted .ipynb files")
    parser.add_argument("--csv", required=True, help="where to write the grades (one row per submission and exercise)")
    parser.add_argument("--json", help="also write every verdict in full, and the cells that ran, as JSON")
    parser.add_argument("--timeout", type=float, default=120, help="seconds for a submission's cells (default 120)")
    parser.add_argument("--check-timeout", type=float, default=60, help="seconds for one check (default 60)")
    parser.add_argument("--seed", type=int, help="the checkers' seed (default: a random one, printed)")
    parser.add_argument("--chapter", help="the chapter, e.g. 01 or 01_diffusion (default: read from the labels)")
    args = parser.parse_args(argv)

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    print(f"grading {len(args.submissions)} submission(s) with seed {seed}", file=sys.stderr)
    submissions, status = [], 0
    for path in args.submissions:
        try:
            submission = grade_notebook(path, seed, args.timeout, args.check_timeout, args.chapter)
        except (OSError, ValueError) as error:  # unreadable, not a notebook, or no chapter: say so, grade the rest
            print(f"{path}: not graded: {error}", file=sys.stderr)
            status = 1
            continue
        submissions.append(submission)
        print(f"{path}: {submission.points:g} / {submission.max_points:g} ({submission.seconds:.1f} s)", file=sys.stderr)
    write_csv(submissions, args.csv)
    if args.json:
        write_json(submissions, args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())
