"""The chapters' figure and table helpers (ldm_teach/viz.py)."""
import matplotlib
import pytest
import torch

from ldm_teach import viz

matplotlib.use("Agg")


def test_spread_gives_mean_and_range():
    assert viz.spread([0.5, 1.0, 0.75]) == "0.75 (0.50 to 1.00)"
    assert viz.spread([1, 2], digits=0) == "2 (1 to 2)"


def test_markdown_table_shows_every_cell(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", shown.append)
    viz.markdown_table(["method", "share"], [["LoRA", 0.5], ["textual inversion", 1]])
    assert shown[0].data.splitlines() == ["| method | share |", "|---|---|", "| LoRA | 0.5 |",
                                          "| textual inversion | 1 |"]


def test_image_grid_puts_each_image_in_its_cell():
    rows = [torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)]
    fig = viz.image_grid(rows, ["first", "second"], ["a", "b", "c"], suptitle="grid")
    axes = fig.axes
    assert len(axes) == 6 and axes[0].get_title() == "a" and axes[3].get_ylabel() == "second"
    assert torch.allclose(torch.as_tensor(axes[4].images[0].get_array()), rows[1][1].permute(1, 2, 0))


def test_to_numpy_image_refuses_a_batch():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        viz.to_numpy_image(torch.zeros(2, 3, 8, 8))
