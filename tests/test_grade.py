"""The grader: fresh kernels, the checkers called by the grader itself, partial and stopped notebooks, the CSV."""
import csv
import json
import pathlib
import sys

import nbformat

from ldm_teach import grade
from ldm_teach.exercises import registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_book  # noqa: E402

HEADER = "\n".join(f":::{{exercise}} {e.title}\n:label: {e.label}\n:::" for e in registry.for_chapter("01"))
Q_SAMPLE = """\
import torch

def q_sample(x0, t, noise, alphas_cumprod):
    alpha_prod = alphas_cumprod[t].double().reshape(-1, *[1] * (x0.ndim - 1))  # float64, then back
    return (alpha_prod.sqrt() * x0 + (1 - alpha_prod).sqrt() * noise).float()
"""
POSTERIOR_MEAN = """\
def posterior_mean(x0, x_t, t, alphas_cumprod):
    alpha_prod = alphas_cumprod[t]
    alpha_prod_prev = alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0)
    beta = 1 - alpha_prod / alpha_prod_prev
    return (alpha_prod_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - alpha_prod_prev) * x_t) / (1 - alpha_prod)
"""
DDIM_STEP = """\
def ddim_step(eps, x_t, alpha_prod_t, alpha_prod_prev):
    x0 = (x_t - (1 - alpha_prod_t).sqrt() * eps) / alpha_prod_t.sqrt()
    return alpha_prod_prev.sqrt() * x0 + (1 - alpha_prod_prev).sqrt() * eps
"""


def notebook(tmp_path, name, *code_cells):
    cells = [nbformat.v4.new_markdown_cell(HEADER)] + [nbformat.v4.new_code_cell(source) for source in code_cells]
    path = tmp_path / name
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    return path


def by_label(submission):
    return {grade.label: grade for grade in submission.grades}


def test_the_chapter_scores_full_marks_and_its_student_edition_zero(tmp_path):
    chapter = json.loads((ROOT / "chapters" / "01_diffusion.ipynb").read_text())
    student = tmp_path / "student.ipynb"
    student.write_text(json.dumps(build_book.strip_solutions(chapter)))
    solved = grade.grade_notebook(ROOT / "chapters" / "01_diffusion.ipynb", seed=12345)
    assert solved.assignment == "01_diffusion" and solved.points == solved.max_points == 3, solved.grades
    stubs = grade.grade_notebook(student, seed=12345)
    assert stubs.points == 0 and stubs.max_points == 3
    assert all("unchanged" in g.message or "differ" in g.message for g in stubs.grades), stubs.grades


def test_one_wrong_answer_fails_that_exercise_only_and_a_raising_cell_keeps_the_rest(tmp_path):
    forgot_renoise = "def ddim_step(eps, x_t, alpha_prod_t, alpha_prod_prev):\n" \
                     "    return (x_t - (1 - alpha_prod_t).sqrt() * eps) / alpha_prod_t.sqrt()\n"
    path = notebook(tmp_path, "alice.ipynb", Q_SAMPLE, POSTERIOR_MEAN, forgot_renoise,
                    "print('✅ ddim_step: correct')  # printing success earns nothing")
    grades = by_label(grade.grade_notebook(path, seed=7))
    assert grades["ex-q-sample"].passed and grades["ex-posterior-mean"].passed
    assert not grades["ex-ddim-step"].passed and "previous noise level" in grades["ex-ddim-step"].message

    halfway = notebook(tmp_path, "bob.ipynb", Q_SAMPLE, "raise RuntimeError('stuck here')\n" + POSTERIOR_MEAN, DDIM_STEP)
    submission = grade.grade_notebook(halfway, seed=7)
    grades = by_label(submission)
    assert grades["ex-q-sample"].passed and grades["ex-ddim-step"].passed
    assert not grades["ex-posterior-mean"].passed and "RuntimeError: stuck here" in grades["ex-posterior-mean"].message
    assert submission.points == 2


def test_endless_loops_are_stopped_and_graded(tmp_path):
    looping_cell = "while True:\n    pass\n" + POSTERIOR_MEAN
    looping_function = "def ddim_step(eps, x_t, alpha_prod_t, alpha_prod_prev):\n    while True:\n        pass\n"
    path = notebook(tmp_path, "carol.ipynb", Q_SAMPLE, looping_function, looping_cell)
    submission = grade.grade_notebook(path, seed=1, timeout=20, check_timeout=10)
    grades = by_label(submission)
    assert grades["ex-q-sample"].passed
    assert not grades["ex-posterior-mean"].passed and "time limit" in grades["ex-posterior-mean"].message
    assert not grades["ex-ddim-step"].passed and "did not finish within 10 s" in grades["ex-ddim-step"].message
    assert submission.seconds < 120


def test_the_command_writes_one_row_per_exercise_and_a_total(tmp_path):
    path = notebook(tmp_path, "dave.ipynb", Q_SAMPLE)
    assert grade.main([str(path), "--csv", str(tmp_path / "grades.csv"), "--json", str(tmp_path / "grades.json"),
                       "--seed", "99"]) == 0
    with open(tmp_path / "grades.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert list(table[0]) == grade.COLUMNS
    assert [row["label"] for row in table] == ["ex-q-sample", "ex-posterior-mean", "ex-ddim-step", "total"]
    assert [row["passed"] for row in table] == ["1", "0", "0", "0"]
    assert "no code cell of the notebook defines `posterior_mean`" in table[1]["message"]
    assert table[-1]["points"] == "1" and table[-1]["max_points"] == "3" and table[0]["student_id"] == "dave"
    assert all("\n" not in row["message"] for row in table)
    saved = json.loads((tmp_path / "grades.json").read_text())
    assert saved[0]["seed"] == 99 and saved[0]["points"] == 1


def test_cells_are_chosen_by_what_they_define():
    chapter = json.loads((ROOT / "chapters" / "03_clip.ipynb").read_text())
    functions = {exercise.function for exercise in registry.for_chapter("03", auto_graded=True)}
    plan = grade.plan_cells(chapter, functions)
    roles = {role for _, role, _ in plan}
    assert roles == {"imports", "definitions", "answer"} or roles == {"imports", "answer"}
    answers = [source for _, role, source in plan if role == "answer"]
    for function in functions:
        assert any(f"def {function}(" in source for source in answers), function
    assert not any("train_clip(" in source for _, role, source in plan if role != "answer")
    assert grade.chapter_of(chapter) == "03_clip"
