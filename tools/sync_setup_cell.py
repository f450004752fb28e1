"""Write the shared first cell and metadata into every chapter, with the repository URL from _config.yml.

The URL lives in one place, `repository.url` in _config.yml; run this after changing it
(a fork, say). tests/test_book.py fails when a chapter's first cell is out of date.
"""
from __future__ import annotations

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"


def repository_url() -> str:
    match = re.search(r"^repository:\s*\n\s+url:\s*(\S+)", (ROOT / "_config.yml").read_text(), re.M)
    if not match:
        raise SystemExit("_config.yml has no repository.url")
    return match.group(1)


def setup_cell_source() -> str:
    return f'''# Setup, the same first cell in every chapter. In Colab it installs the book's package,
# ldm_teach, from the repository; everywhere it picks the device and the profile.
import subprocess, sys
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    "ldm_teach[reference] @ git+{repository_url()}"], check=True)
from ldm_teach import runtime
rt = runtime.setup()'''


def setup_cell() -> dict:
    return {"cell_type": "code", "execution_count": None, "id": "setup",
            "metadata": {"tags": ["setup", "hide-input"]}, "outputs": [], "source": setup_cell_source().splitlines(keepends=True)}


# A Python 3 kernel everywhere, and in Colab a GPU runtime (T4) from the start.
METADATA = {
    "accelerator": "GPU",
    "colab": {"gpuType": "T4", "provenance": []},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def sync(path: pathlib.Path) -> bool:
    """Make the notebook's first cell the setup cell and set its metadata; True if the file changed."""
    before = path.read_text()
    notebook = json.loads(before)
    cells = notebook["cells"]
    if cells and "setup" in cells[0].get("metadata", {}).get("tags", []):
        cells[0] = setup_cell()
    else:
        cells.insert(0, setup_cell())
    notebook["metadata"] = METADATA
    after = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
    path.write_text(after)
    return after != before


if __name__ == "__main__":
    for notebook_path in sorted(CHAPTERS.glob("*.ipynb")):
        print(("updated " if sync(notebook_path) else "ok      ") + str(notebook_path.relative_to(ROOT)))
