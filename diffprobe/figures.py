"""Figures shared by result types and the HTML report: witness images, verdict histograms,
the certified-bound-vs-eps curve. Matplotlib is imported only when a figure is drawn."""
import base64
import io
import math

VERDICT_COLORS = {"verified": "tab:green", "unknown": "tab:orange", "falsified": "tab:red", None: "tab:gray"}


def image_of(x, shape):
    """A 2-d (or HxWx3) array for an input that looks like an image, else None."""
    import numpy as np
    x = np.asarray(x, dtype=float)
    dims = [s for s in shape if s != 1]
    if len(dims) == 3 and dims[0] in (1, 3):
        return x.reshape(dims).transpose(1, 2, 0) if dims[0] == 3 else x.reshape(dims[1:])
    if len(dims) == 2:
        return x.reshape(dims)
    side = math.isqrt(x.size)
    if len(dims) == 1 and side * side == x.size and side >= 4:  # flattened square images (MNIST, digits)
        return x.reshape(side, side)
    return None


def figure(width, height):
    """A figure outside pyplot: drawing one for a report or a thumbnail neither opens a window,
    nor shows up in a notebook, nor needs (or changes) the process's matplotlib backend."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height))


def on_axes(ax):
    """`ax`, or pyplot's current axes when none is given (a result's `plot` in a notebook)."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt
    return plt.gca()


def png_base64(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=80)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail(x, shape, size=1.0):
    """A base64 PNG of an image-like input, or None."""
    img = image_of(x, shape)
    if img is None:
        return None
    fig = figure(size, size)
    ax = fig.subplots()
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
    ax.axis("off")
    return png_base64(fig)


def bars(ax, lower, upper, label):
    """Per-output intervals as floating bars."""
    ax.bar(range(len(lower)), [u - l for l, u in zip(lower, upper)], bottom=lower, alpha=0.6, label=label)
    ax.axhline(0, color="black", lw=0.5)


def verdict_histogram(points, threshold, ax):
    """Certified bounds per point, stacked by verdict, with the threshold."""
    values = {v: [p.bound for p in points if (p.verdict.value if p.verdict else None) == v] for v in VERDICT_COLORS}
    values = {v: b for v, b in values.items() if b}
    ax.hist(list(values.values()), bins=30, stacked=True, color=[VERDICT_COLORS[v] for v in values],
            label=[str(v) for v in values])
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", label="threshold")
    ax.set_xlabel("certified bound per point")
    ax.set_ylabel("points")
    ax.legend()
    return ax


def eps_curve(reports, ax):
    """Worst and median certified bound (and worst witness) against the radius."""
    import numpy as np
    reports = sorted((r for r in reports if r.eps is not None), key=lambda r: r.eps)
    eps = [r.eps for r in reports]
    ax.plot(eps, [r.bound for r in reports], "o-", label="worst certified bound")
    ax.plot(eps, [float(np.median([p.bound for p in r.points])) for r in reports], "s--",
            label="median certified bound")
    ax.plot(eps, [r.found for r in reports], "^:", label="worst witness found")
    if reports and reports[0].threshold is not None:
        ax.axhline(reports[0].threshold, color="black", ls="--", lw=0.8, label="threshold")
    ax.set_xlabel("eps")
    ax.set_ylabel(reports[0].difference if reports else "difference")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.legend()
    return ax


def witness_gallery(points, shape, n=8):
    """A figure with the witnesses of the riskiest points (image inputs), or None."""
    points = [p for p in points if p.witness][:n]
    if not points or image_of(points[0].witness, shape) is None:
        return None
    fig = figure(1.6 * len(points), 1.9)
    axes = fig.subplots(1, len(points), squeeze=False)
    for ax, p in zip(axes[0], points):
        ax.imshow(image_of(p.witness, shape), cmap="gray")
        ax.set_title(f"#{p.index} {p.verdict.value if p.verdict else ''}\n{p.found:.3g}", fontsize=8)
        ax.axis("off")
    return fig


def output_bars(series, title):
    """A small base64 PNG of side-by-side bars, one series per entry of `series`."""
    import numpy as np

    def draw(ax):
        width = 0.8 / max(len(series), 1)
        for i, (name, values) in enumerate(series.items()):
            ax.bar(np.arange(len(values)) + i * width, values, width=width, label=name)
        ax.legend(fontsize=6)
    return _small_png(draw, title)


def interval_png(lower, upper, label):
    """A small base64 PNG of per-output certified intervals."""
    return _small_png(lambda ax: bars(ax, lower, upper, label), f"certified {label} per output")


def _small_png(draw, title):
    """A thumbnail-sized figure drawn by `draw(ax)`, as base64 PNG (beside a result's table)."""
    fig = figure(3, 1.8)
    ax = fig.subplots()
    draw(ax)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)
    return png_base64(fig)
