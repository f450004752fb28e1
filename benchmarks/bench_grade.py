"""Time the grader on 5 submissions of every chapter, and check what they score.

For each chapter 00-06 it grades, each in its own fresh kernel, three copies of the chapter itself
(its solution cells define every function: full marks expected) and two of its student edition
(the starting code only: zero expected), and prints the seconds per submission, the median and the
spread, and the extrapolation to 50 submissions. Run: `python benchmarks/bench_grade.py [chapters ...]`.
"""
import json
import pathlib
import shutil
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_book  # noqa: E402

from ldm_teach import grade  # noqa: E402


def main(chapters: list[str]) -> int:
    paths = [p for p in sorted((ROOT / "chapters").glob("0*.ipynb")) if not chapters or p.stem[:2] in chapters]
    failures = 0
    print(f"{'chapter':14s} {'scores (3 solved, 2 student editions)':40s} {'s/submission: median (min-max)':32s} 5 | 50")
    with tempfile.TemporaryDirectory() as folder:
        for path in paths:
            notebook = json.loads(path.read_text())
            student = pathlib.Path(folder) / f"{path.stem}_student.ipynb"
            student.write_text(json.dumps(build_book.strip_solutions(notebook)))
            solved = pathlib.Path(folder) / f"{path.stem}.ipynb"
            shutil.copy(path, solved)
            submissions = [grade.grade_notebook(p, seed=2026 + i) for i, p in
                           enumerate([solved, student, solved, student, solved])]
            seconds = [s.seconds for s in submissions]
            scores = [f"{s.points:g}/{s.max_points:g}" for s in submissions]
            full = submissions[0].max_points
            expected = [full, 0, full, 0, full]
            ok = [s.points == e for s, e in zip(submissions, expected)]
            failures += not all(ok)
            total = sum(seconds)
            print(f"{path.stem:14s} {' '.join(scores):40s} {statistics.median(seconds):6.1f} "
                  f"({min(seconds):.1f}-{max(seconds):.1f}){'':18s} {total:5.0f} s | {total * 10 / 60:4.1f} min"
                  + ("" if all(ok) else "   UNEXPECTED SCORES"))
            for submission in submissions:
                for g in submission.grades:
                    if (g.passed and submission.file.endswith("_student.ipynb")) or (
                            not g.passed and not submission.file.endswith("_student.ipynb")):
                        print(f"    {pathlib.Path(submission.file).name} {g.label}: {g.message.splitlines()[0]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
