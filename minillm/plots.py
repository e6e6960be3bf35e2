"""The figures chapters save, as PNG files.

Figures are built with matplotlib's object-oriented API (``matplotlib.figure.Figure``), never
``pyplot``: no global state, no GUI backend, safe in scripts, tests and notebooks alike. Each
function saves to ``path`` and returns it; a notebook shows the file with
``IPython.display.Image(path)``.
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping, Sequence

from matplotlib.figure import Figure

Curve = Sequence[float] | tuple[Sequence[float], Sequence[float]]


def save_figure(fig: Figure, path: str | os.PathLike) -> pathlib.Path:
    """Save ``fig`` as a PNG at ``path`` (folders created as needed) and return the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard's smoothing slider does.

    :math:`s_t = w s_{t-1} + (1 - w) x_t`, reported as :math:`s_t / (1 - w^t)`.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, running = [], 0.0
    for t, value in enumerate(values, start=1):
        running = weight * running + (1 - weight) * value
        out.append(running / (1 - weight**t))
    return out


def _xy(curve: Curve) -> tuple[Sequence[float], Sequence[float]]:
    if isinstance(curve, tuple) and len(curve) == 2 and not isinstance(curve[0], (int, float)):
        return curve
    return range(len(curve)), curve  # type: ignore[arg-type]


def _draw_curves(ax, curves: Mapping[str, Curve], smoothing: float) -> None:
    for index, (name, curve) in enumerate(curves.items()):
        xs, ys = _xy(curve)
        color = f"C{index}"
        if smoothing > 0:
            ax.plot(xs, ys, color=color, alpha=0.2, linewidth=0.8)
            ys = smooth(ys, smoothing)
        ax.plot(xs, ys, color=color, label=name, linewidth=1.6)


def plot_curves(
    curves: Mapping[str, Curve],
    path: str | os.PathLike,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "loss",
    logy: bool = False,
    smoothing: float = 0.0,
) -> pathlib.Path:
    """Line plot of several named curves; each is a list of y values or an ``(xs, ys)`` pair.

    With ``smoothing > 0`` the raw curve is drawn faintly and its moving average on top.
    """
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    _draw_curves(ax, curves, smoothing)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return save_figure(fig, path)


def plot_loss_curves(curves: Mapping[str, Curve], path: str | os.PathLike, title: str = "Training loss", **kwargs) -> pathlib.Path:
    """Loss against step for one or more runs (see :func:`plot_curves` for the options)."""
    return plot_curves(curves, path, title=title, **kwargs)


def plot_lr_schedule(lrs: Sequence[float], path: str | os.PathLike, title: str = "Learning-rate schedule") -> pathlib.Path:
    """The learning rate of every optimizer step."""
    return plot_curves({"learning rate": lrs}, path, title=title, xlabel="optimizer step", ylabel="learning rate")


def plot_panels(
    panels: Sequence[Mapping[str, object]],
    path: str | os.PathLike,
    title: str = "",
) -> pathlib.Path:
    """Several :func:`plot_curves`-style panels side by side.

    Each panel is a dict with ``curves`` (name -> curve) and optionally ``xlabel``, ``ylabel``,
    ``title``, ``logy``, ``smoothing``, and ``scatter`` (name -> (xs, ys) drawn as points).
    """
    fig = Figure(figsize=(6 * len(panels), 4.2))
    for position, panel in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), position)
        for index, (name, points) in enumerate(dict(panel.get("scatter", {})).items()):
            ax.scatter(*points, s=8, alpha=0.4, color=f"C{index + 5}", label=name)
        _draw_curves(ax, dict(panel.get("curves", {})), float(panel.get("smoothing", 0.0)))
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set(xlabel=panel.get("xlabel", "step"), ylabel=panel.get("ylabel", ""), title=panel.get("title", ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_scatter(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    title: str = "",
    xlabel: str = "x",
    ylabel: str = "y",
    logx: bool = False,
    labels: Mapping[str, Sequence[str]] | None = None,
) -> pathlib.Path:
    """Points: one colour per named series of ``(xs, ys)``, each point optionally annotated with its
    text in ``labels[name]`` (e.g. the settings of a hyperparameter-search trial)."""
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys) or len((labels or {}).get(name, xs)) != len(xs):
            raise ValueError(f"series {name!r} needs as many ys (and labels) as xs ({len(xs)})")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for index, (name, (xs, ys)) in enumerate(series.items()):
        ax.scatter(xs, ys, s=36, color=f"C{index}", label=name, zorder=3)
        texts = (labels or {}).get(name, [])
        for rank, i in enumerate(sorted(range(len(texts)), key=lambda i: xs[i])):  # neighbours: one above, one below
            ax.annotate(texts[i], (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4 if rank % 2 == 0 else -10),
                        fontsize=7, color=f"C{index}")
    if logx:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # label the decades only
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_trajectories_2d(
    loss_fn,
    trajectories: Mapping[str, Sequence[Sequence[float]]],
    path: str | os.PathLike,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    title: str = "Optimizer paths",
    minimum: tuple[float, float] | None = None,
) -> pathlib.Path:
    """Paths of optimizers over the contour lines of a 2-D loss ``loss_fn(x, y)`` (NumPy-vectorized)."""
    import numpy as np

    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    grid_x, grid_y = np.meshgrid(np.linspace(*xlim, 300), np.linspace(*ylim, 300))
    surface = loss_fn(grid_x, grid_y)
    levels = np.quantile(surface, np.linspace(0.0, 0.95, 25))
    ax.contour(grid_x, grid_y, surface, levels=np.unique(levels), cmap="Greys", linewidths=0.6)
    for index, (name, points) in enumerate(trajectories.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, "-", marker=".", markersize=3, linewidth=1.2, color=f"C{index}", label=name)
    if minimum is not None:
        ax.plot(*minimum, "k*", markersize=12, label="minimum")
    ax.set(xlim=xlim, ylim=ylim, xlabel="$\\theta_1$", ylabel="$\\theta_2$", title=title)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_histogram(
    samples: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "",
    xlabel: str = "value",
    bins: int | Sequence[float] = 50,
    markers: Mapping[str, float] | None = None,
) -> pathlib.Path:
    """Overlaid histograms of one or more named samples (shared bins: a count or the edges, e.g.
    ``range(n)`` for integers), with labelled vertical lines (``markers``: label -> x, e.g. a percentile)."""
    import numpy as np

    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(np.concatenate([np.asarray(v, dtype=float) for v in samples.values()]), bins=bins)
    for index, (name, values) in enumerate(samples.items()):
        ax.hist(values, bins=edges, alpha=0.5 if len(samples) > 1 else 0.8, color=f"C{index}", label=name)
    for index, (label, x) in enumerate((markers or {}).items()):
        ax.axvline(x, color=f"C{index + len(samples)}", linestyle="--", linewidth=1.2, label=label)
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    ax.grid(alpha=0.3)
    if len(samples) > 1 or markers:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_bars(
    groups: Mapping[str, Sequence[float]],
    labels: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
    ylabel: str = "value",
) -> pathlib.Path:
    """Grouped bars: for each of ``labels`` (x positions), one bar per named group, e.g. the
    probabilities of the same candidate tokens under several temperatures."""
    import numpy as np

    if any(len(values) != len(labels) for values in groups.values()):
        raise ValueError(f"every group needs one value per label ({len(labels)})")
    fig = Figure(figsize=(max(6.0, 0.5 * len(labels) * max(1, len(groups)) ** 0.5 + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(groups))
    positions = np.arange(len(labels))
    for index, (name, values) in enumerate(groups.items()):
        ax.bar(positions + (index - (len(groups) - 1) / 2) * width, values, width, label=name, color=f"C{index}")
    ax.set_xticks(positions, labels=list(labels))
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis="y")
    if len(groups) > 1:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_heatmap(
    matrix,
    path: str | os.PathLike,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    cmap: str = "RdBu_r",
    colorbar_label: str = "value",
) -> pathlib.Path:
    """One 2-D array as an image with a colorbar, row 0 at the top (e.g. a position-encoding table).

    The colour scale is symmetric around 0 for signed data (the default diverging ``cmap``)."""
    import numpy as np

    values = np.asarray(matrix.detach().cpu() if hasattr(matrix, "detach") else matrix, dtype=float)
    if values.ndim != 2 or 0 in values.shape:
        raise ValueError(f"a heatmap needs a non-empty 2-D array, got shape {values.shape}")
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.add_subplot()
    limit = float(np.nanmax(np.abs(values))) or 1.0
    signed = bool((values < 0).any())
    image = ax.imshow(values, cmap=cmap if signed else "viridis", vmin=-limit if signed else None,
                      vmax=limit if signed else None, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return save_figure(fig, path)


def plot_attention(
    weights,
    path: str | os.PathLike,
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    titles: Sequence[str] | None = None,
    title: str = "",
    xlabel: str = "key position",
    ylabel: str = "query position",
    columns: int | None = None,
) -> pathlib.Path:
    """Heatmaps of attention weights: row i is query i's distribution over the keys (columns).

    ``weights`` is one (L, S) map or a stack (n, L, S), e.g. one map per head, drawn as n panels
    side by side (``columns`` per row; default: all in one row) on one shared colour scale from 0
    to the largest weight (a tensor or an array). ``x_labels`` (S of them) and ``y_labels`` (L)
    label the keys and queries, e.g. with their tokens; ``titles`` names the panels.
    """
    import numpy as np

    maps = np.asarray(weights.detach().cpu() if hasattr(weights, "detach") else weights, dtype=float)
    if maps.ndim == 2:
        maps = maps[None]  # (1, L, S)
    if maps.ndim != 3 or 0 in maps.shape:
        raise ValueError(f"attention weights must have shape (L, S) or (n, L, S), got {maps.shape}")
    n_maps, query_len, key_len = maps.shape
    if x_labels is not None and len(x_labels) != key_len:
        raise ValueError(f"{len(x_labels)} x_labels for {key_len} keys")
    if y_labels is not None and len(y_labels) != query_len:
        raise ValueError(f"{len(y_labels)} y_labels for {query_len} queries")
    if titles is not None and len(titles) != n_maps:
        raise ValueError(f"{len(titles)} titles for {n_maps} maps")
    columns = n_maps if columns is None else max(1, min(columns, n_maps))
    rows = -(-n_maps // columns)  # ceiling division
    cell = min(0.45, 6.0 / max(query_len, key_len))  # inches per cell: large maps shrink to fit
    fig = Figure(figsize=(columns * (key_len * cell + 1.0) + 1.2, rows * (query_len * cell + 1.0) + 0.4), layout="constrained")
    grid = fig.subplots(rows, columns, squeeze=False)
    axes = list(grid.flat)[:n_maps]
    for ax in list(grid.flat)[n_maps:]:
        ax.set_visible(False)  # the unused cells of the last row
    top = max(float(np.nanmax(maps)), 1e-12) if np.isfinite(maps).any() else 1.0  # colour scale 0 .. largest weight
    for index, ax in enumerate(axes):
        image = ax.imshow(maps[index], cmap="viridis", vmin=0.0, vmax=top, aspect="equal", interpolation="nearest")
        if x_labels is not None or key_len <= 24:  # otherwise matplotlib's own sparser ticks
            ax.set_xticks(range(key_len), labels=x_labels if x_labels is not None else range(key_len))
        if y_labels is not None or query_len <= 24:
            ax.set_yticks(range(query_len), labels=y_labels if y_labels is not None else range(query_len))
        ax.tick_params(labelsize="small", length=0)
        ax.set_xlabel(xlabel)
        if index % columns == 0:
            ax.set_ylabel(ylabel)
        if titles is not None:
            ax.set_title(titles[index])
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_confusion_matrix(
    matrix,
    labels: Sequence[str],
    path: str | os.PathLike,
    title: str = "Confusion matrix",
) -> pathlib.Path:
    """A (C, C) confusion matrix as a grid of cells with the count written in each.

    Rows are the true class and columns the predicted class, as :func:`minillm.metrics.confusion_matrix`
    returns it (a list of lists, an array or a tensor); ``labels`` names the C classes in order.
    A cell's shade is its share of its row (the recall of that true class, or the rate at which
    it is mistaken for another), so a small class's errors show as clearly as a large one's.
    """
    import numpy as np

    counts = np.asarray(matrix.detach().cpu() if hasattr(matrix, "detach") else matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"a confusion matrix must be square (C, C) with C >= 1, got shape {counts.shape}")
    if len(labels) != counts.shape[0]:
        raise ValueError(f"{len(labels)} labels for a {counts.shape[0]}-class confusion matrix")
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals != 0)
    size = min(8.0, 2.2 + 0.9 * len(labels))
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    for (row, column), count in np.ndenumerate(counts):
        text = f"{int(count):,}" if float(count).is_integer() else f"{count:.3g}"
        ax.text(column, row, text, ha="center", va="center", color="white" if shares[row, column] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels=list(labels))
    ax.set_yticks(range(len(labels)), labels=list(labels))
    ax.tick_params(length=0)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class (row)")
    return save_figure(fig, path)


def plot_learning_curves(
    curves: Mapping[str, Mapping[float, Sequence[float]]],
    path: str | os.PathLike,
    title: str = "Accuracy against labelled examples",
    xlabel: str = "labelled training examples (log scale)",
    ylabel: str = "accuracy",
    reference: tuple[str, float] | None = None,
) -> pathlib.Path:
    """Learning curves with their spread: ``curves[name][x]`` holds one score per seed at ``x`` labelled
    examples; each curve is drawn through the means, its seeds' range (min to max) shaded, on a log x axis.
    Names that share their text before the last ", " (say "BERT, pretrained" and "BERT, random init")
    share a colour, pretrained solid and the rest dashed; ``reference`` is a horizontal line (name, value),
    e.g. the majority class."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    colours: dict[str, str] = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown"]
    for name, points in curves.items():
        family, _, init = name.rpartition(", ")  # "BERT, pretrained longer (shipped)", "random init"
        colour = colours.setdefault(family or name, palette[len(colours) % len(palette)])
        xs = sorted(points)
        means = [sum(points[x]) / len(points[x]) for x in xs]
        style = "-" if "pretrained" in init else "--"
        ax.plot(xs, means, style, marker="o", color=colour, label=name)
        ax.fill_between(xs, [min(points[x]) for x in xs], [max(points[x]) for x in xs], color=colour, alpha=0.15)
    if reference is not None:
        ax.axhline(reference[1], color="grey", linestyle=":", label=reference[0])
    ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
