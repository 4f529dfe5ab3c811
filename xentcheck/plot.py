"""The sweep as an image: bits of error against logit magnitude (matplotlib, an optional
extra), in any format matplotlib writes without outside tools, chosen by the file's suffix."""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .precision import Precision
from .sweep import SweepResult

# matplotlib writes these itself; pgf needs a LaTeX installation, so it is left out.
NEEDS_OUTSIDE_TOOLS = ("pgf",)


def plot_format(path: Path) -> str:
    """The image format for ``path``'s suffix; checked before a sweep computes anything.

    Raises
    ------
    UsageError
        When matplotlib is missing, the suffix names no format it writes, or the folder
        does not exist.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'xentcheck[plot]'") from None
    formats = sorted(set(FigureCanvasAgg.get_supported_filetypes()) - set(NEEDS_OUTSIDE_TOOLS))
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        problem = f"matplotlib writes no '.{suffix}' images" if suffix else "no suffix"
        raise UsageError(f"--plot {path}: {problem}; the suffix chooses the format: end the "
                         f"name with one of .{', .'.join(formats)}")
    if not path.parent.is_dir():
        raise UsageError(f"--plot {path}: no such folder {str(path.parent)!r}")
    return suffix


def write_sweep_plot(result: SweepResult, path: Path) -> None:
    """One panel per dtype, one line per pipeline; a cross where the loss stops being finite.

    The format follows the suffix (``.png``, ``.pdf``, ``.svg``, ...: :func:`plot_format`).
    """
    image_format = plot_format(path)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    dtypes = list(dict.fromkeys(c.dtype for c in result.curves))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.2 * len(dtypes), 3.6), squeeze=False,
                             sharey=False)
    spec = result.spec
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        full = Precision(dtype).mantissa_bits + 1
        curves = [c for c in result.curves if c.dtype == dtype]
        for i, curve in enumerate(curves):
            # Formulations often agree exactly: dashes keep a hidden line visible.
            (line,) = ax.plot(result.magnitudes, curve.bits, label=curve.pipeline,
                              lw=2.2 - 0.5 * i, ls=("-", "--", ":", "-.")[i % 4])
            if curve.first_nonfinite is not None:
                ax.axvline(curve.first_nonfinite, color=line.get_color(), ls=":", lw=1)
                ax.plot([curve.first_nonfinite], [full], marker="x", color=line.get_color(),
                        ms=8, mew=2)
        ax.set_title(dtype)
        if spec.log_scale:
            ax.set_xscale("log")
        ax.set_ylim(-0.5, full + 1)
        ax.axhline(full, color="0.7", lw=0.8)
        ax.set_xlabel("logit magnitude")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("bits of error, log2(1 + ulps)")
    axes[0][-1].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"xentcheck sweep: {spec.family}, C = {spec.classes}, pattern "
                 f"'{spec.pattern}' (x: not finite from here)", fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format=image_format)
    except OSError as exc:
        raise UsageError(f"--plot {path}: cannot write it ({exc.strerror})") from None
    except (ValueError, RuntimeError) as exc:  # e.g. an image library without that format
        raise UsageError(f"--plot {path}: matplotlib cannot write it here "
                         f"({str(exc).splitlines()[0]})") from None
    finally:
        plt.close(fig)
