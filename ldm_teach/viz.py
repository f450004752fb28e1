"""Figures the chapters draw: image grids, tables, 2-D sample clouds, source listings and sliders."""
from __future__ import annotations

import inspect

import matplotlib.pyplot as plt
import numpy as np
import torch


def to_numpy_image(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) floats in [0, 1], clipped, ready for ``imshow``."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape (3, H, W) or (1, H, W), got {tuple(image.shape)}.")
    array = ((image.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, C)
    return array[..., 0] if array.shape[-1] == 1 else array


def show_images(images, titles=None, ncols: int | None = None, size: float = 2.0, suptitle: str | None = None):
    """A row (or grid) of images given as a (B, 3, H, W) tensor or a list of (3, H, W), in [-1, 1]."""
    images = list(images)
    ncols = ncols or len(images)
    nrows = (len(images) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if titles else 0)),
                             squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(images):
            ax.imshow(to_numpy_image(images[index]), cmap="gray", interpolation="nearest" if images[index].shape[-1] <= 64 else None)
            if titles is not None:
                ax.set_title(titles[index], fontsize=10)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def image_grid(rows, row_labels, column_titles=None, size: float = 1.2, label_width: float = 2.4,
               suptitle: str | None = None):
    """Rows of (N, 3, H, W) images in [0, 1] (what ``output_type="pt"`` returns), each row labelled on its left."""
    fig, axes = plt.subplots(len(rows), len(rows[0]), squeeze=False,
                             figsize=(label_width + size * len(rows[0]), size * len(rows) + 0.5))
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        for c, image in enumerate(images):
            axes[r, c].imshow(image.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if column_titles and r == 0:
                axes[r, c].set_title(column_titles[c], fontsize=9)
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=label_width / (label_width + size * len(rows[0])), wspace=0.05, hspace=0.1)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def markdown_table(header, rows) -> None:
    """Display rows (lists of cells) as a Markdown table, which the book renders as a table."""
    from IPython.display import Markdown, display

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    display(Markdown("\n".join(lines)))


def spread(values, digits: int = 2) -> str:
    """Mean, and the smallest and largest value over seeds, as 'mean (min to max)'."""
    values = np.asarray(values)
    return f"{values.mean():.{digits}f} ({values.min():.{digits}f} to {values.max():.{digits}f})"


def scatter_2d(ax, points: torch.Tensor, title: str | None = None, color="C0", limit: float = 3.0):
    """A 2-D sample cloud on a fixed square frame, so panels can be compared by eye."""
    points = points.detach().cpu().numpy()
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5, color=color, linewidths=0)
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=11)


def show_source(obj) -> None:
    """Display the package source of a function or class, highlighted, so the page shows the real code."""
    from IPython.display import Markdown, display

    source = inspect.getsource(obj)
    module = inspect.getmodule(obj).__name__
    display(Markdown(f"`{module}.{obj.__qualname__}`\n```python\n{source}```"))


def interactive_figure(draw, **controls):
    """A figure that redraws when a control changes: ``draw(**values)`` returns a matplotlib Figure.

    ``controls`` are ipywidgets (sliders, dropdowns) named like ``draw``'s arguments. The figure is
    shown as an image widget rather than through ``ipywidgets.interact``'s captured output, so a
    notebook executed without a browser (nbmake, the book build) never waits on it.
    """
    import io

    import ipywidgets as widgets

    image = widgets.Image(format="png")

    def redraw(_change=None):
        figure = draw(**{name: control.value for name, control in controls.items()})
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
        plt.close(figure)
        image.value = buffer.getvalue()

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([*controls.values(), image])
