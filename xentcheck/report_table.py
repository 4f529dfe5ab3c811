"""The report for a person: one rich table per scenario. Renders findings; computes nothing."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .expectations import Verdict
from .findings import Finding, Mismatch, ScenarioResult
from .limits import LimitRow
from .precision import Precision
from .sweep import SweepCurve, SweepResult, downsample

FLAG_STYLES = {
    "nan": "bold red",
    "inf": "bold red",
    "overflow": "red",
    "underflow": "yellow",
    "precision_loss": "yellow",
    "input_rounding": "cyan",
}
LEGEND = (
    "flags: nan/inf = the loss is NaN/infinite · overflow = a stage made ±inf from finite "
    "values · underflow = a value that matters was flushed to 0 or a subnormal · "
    "precision_loss = error beyond tolerance · input_rounding = rounding the inputs alone "
    "moves the loss beyond tolerance.\n"
    "gradient: max |g - g_ref| / max |g_ref| of d loss / d logits as autodiff of the "
    "formulation computes it (zeroed = entries flushed to 0 that should not be; the stage is "
    "the first the backward pass goes through that makes it bad).\n"
    "safe logit ≤: every input whose logits stay below it gives a finite loss (worst case: "
    "all C logits equal) · safe spread ≤: the same for the gap between a row's largest logit "
    "and its target's (every class's with one-hot/probability labels or label smoothing) · "
    "≥: the lower edge, against the smallest logit whose probability is "
    "logged (naive exp underflowing to 0/0) · format max/min: no edge before the format's own "
    "range · no safe value: the worst case breaks at every magnitude (a sum of C equal "
    "terms is inf in D)."
)
LABEL_KINDS = {"index": "integer labels", "dense": "one-hot/probability labels",
               "binary": "binary targets"}


def _num(value: float | None, digits: int = 6) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}"


def _loss_text(finding: Finding) -> Text:
    value = finding.loss
    label = ""
    if value is None and finding.per_example is not None and finding.worst_index is not None:
        value = float(finding.per_example[finding.worst_index])
        label = f" @{list(finding.worst_index)}"
    text = Text(_num(value, 9) + label)
    if value is not None and not math.isfinite(value):
        text.stylize("bold red")
    return text


def _flags_text(flags: Sequence[str]) -> Text:
    text = Text()
    for i, flag in enumerate(flags):
        if i:
            text.append(" ")
        text.append(flag, style=FLAG_STYLES.get(flag, ""))
    return text


def _first_bad(finding: Finding) -> Text:
    event = finding.first_bad
    if event is None:
        return Text("—", style="dim")
    where = f" at {list(event.index)}" if event.index else ""
    return Text(f"{event.stage}: {event.kind}{where}", style="red" if event.kind != "underflow"
                else "yellow")


def _gradient_text(finding: Finding) -> Text:
    """The gradient's flags and where it first went bad, or its normwise error."""
    if finding.grad_error is None:
        return Text("—", style="dim")
    flags = finding.grad_flags
    if not flags:
        return Text(f"err {_num(finding.grad_error, 2)}")
    text = Text(" ".join(flags), style="bold red" if {"nan", "inf"} & set(flags) else "yellow")
    event = finding.grad_first_bad
    if event is not None:
        text.append(f" @{event.stage} {list(event.index)}", style="red")
    elif "nan" not in flags:
        text.append(f" err {_num(finding.grad_error, 2)}")
    return text


def _limit_text(limit: float | None, headroom: float | None, dtype: str, *,
                no_safe: bool = False, lower: float | None = None,
                lower_headroom: float | None = None) -> Text:
    """An edge with its headroom; with ``lower``, the lower edge on a second line (where
    the formulation has one)."""
    if no_safe:
        return Text("no safe value", style="bold red")
    text = _edge_text(limit, headroom, dtype)
    if lower is not None and lower != -Precision(dtype).max:
        text.append("\n≥ ")
        text.append_text(_edge_text(lower, lower_headroom, dtype))
    return text


def _edge_text(limit: float | None, headroom: float | None, dtype: str) -> Text:
    if limit is None:
        return Text("—", style="dim")
    if abs(limit) == Precision(dtype).max:
        return Text("format max" if limit > 0 else "format min", style="dim")
    text = Text(_num(limit, 6))
    if headroom is not None:
        if headroom < 0:
            text.append(f" (over by {_num(-headroom, 4)})", style="bold red")
        else:
            text.append(f" ({_num(headroom, 4)} spare)", style="green")
    return text


def _mismatch_line(m: Mismatch) -> str:
    a, b = m.pipelines
    la, lb = (_num(v, 9) for v in m.losses)
    if m.kind == "finiteness":
        return f"  {m.dtype}: {a} gives {la} but {b} gives {lb} (one finite, the other not)"
    return f"  {m.dtype}: {a} gives {la} and {b} gives {lb}, {_num(m.difference, 3)} apart"


def _header(result: ScenarioResult, console: Console) -> None:
    console.print(Text(result.name, style="bold"), Text(result.source, style="dim"))
    if result.description:
        console.print(f"  {result.description}")
    kind = LABEL_KINDS.get(result.label_kind, result.label_kind)
    inputs = "logits" if result.from_logits else "probabilities"
    console.print(
        f"  {result.family} cross-entropy from {inputs}, {kind} · shape "
        f"{list(result.shape)} · {result.classes} class{'es' if result.classes != 1 else ''} · "
        f"reduction {result.reduction}"
    )
    ref = result.reference
    reference = f"{ref.loss:.17g}" if ref.loss is not None else "per example (reduction none)"
    stats = result.stats
    largest = "largest |logit|" if result.family == "sigmoid" else "largest logit"
    line = f"  reference loss {reference} · input {stats.input_dtype}: {largest} " + _num(
        stats.max_abs_logit if result.family == "sigmoid" else stats.max_logit
    )
    if stats.max_spread is not None:
        line += f", largest spread (row max - target logit) {_num(stats.max_spread)}"
    console.print(line)
    if result.class_weights is not None:
        weights = ", ".join(_num(w, 4) for w in result.class_weights)
        console.print(f"  class weights: [{weights}]")


def render_scenario(result: ScenarioResult, console: Console) -> None:
    """One scenario: header, misuse warnings, findings table, input-rounding notes,
    mismatches."""
    _header(result, console)
    for warning in result.warnings:
        console.print(f"  warning {warning.rule} {warning.name}: {warning.message} "
                      f"(xentcheck explain {warning.rule})", style="bold yellow")
    table = Table(show_lines=False, header_style="bold", pad_edge=False)
    for column, justify in (
        ("pipeline", "left"), ("dtype", "left"), ("loss", "right"), ("abs err", "right"),
        ("rel err", "right"), ("ulp err", "right"), ("flags", "left"),
        ("first bad stage", "left"), ("gradient", "left"), ("safe logit ≤", "left"),
        ("safe spread ≤", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    previous = None
    for f in result.findings:
        if previous is not None and f.dtype != previous:
            table.add_section()
        previous = f.dtype
        default = Precision(f.dtype).accumulate_label == f.accumulate
        dtype = f.dtype if default else f"{f.dtype} (acc {f.accumulate})"
        table.add_row(
            f.pipeline, dtype, _loss_text(f), _num(f.abs_error, 3), _num(f.rel_error, 3),
            _num(f.ulp_error, 3), _flags_text(f.flags), _first_bad(f), _gradient_text(f),
            _limit_text(f.limit.largest_safe_logit, f.logit_headroom, f.dtype,
                        no_safe=f.limit.no_safe_logit, lower=f.limit.smallest_safe_logit,
                        lower_headroom=f.lower_logit_headroom),
            _limit_text(f.limit.largest_safe_spread, f.spread_headroom, f.dtype,
                        no_safe=f.limit.no_safe_spread),
        )
    console.print(table)
    ref = result.reference
    changed = [
        f"{dtype} {rounded:.9g}" for dtype, rounded in ref.rounded.items()
        if ref.loss is not None and rounded is not None and rounded != ref.loss
    ]
    if changed and ref.loss is not None:
        console.print(
            f"  loss of the inputs rounded to: {' · '.join(changed)} (reference "
            f"{ref.loss:.9g}; the rest of each error is arithmetic)", style="cyan"
        )
    if result.mismatches:
        console.print("  mismatches between pipelines:", style="bold")
        for m in result.mismatches:
            console.print(_mismatch_line(m))
    console.print()


def render_verdict(result: ScenarioResult, verdict: Verdict, console: Console) -> None:
    """One line per scenario: pass, or fail with each failed expectation and its line."""
    console.print(verdict_line(result, verdict))
    for outcome in verdict.failures:
        where = f"{result.source}:{outcome.expectation.line}" if outcome.expectation.line \
            else outcome.expectation.origin
        console.print(f"      {where}: {outcome.message}", style="red")


def verdict_line(result: ScenarioResult, verdict: Verdict) -> Text:
    text = Text()
    if verdict.passed:
        text.append("PASS", style="bold green")
        count = len(verdict.outcomes)
        text.append(f"  {result.name}  ({result.source}: {count} check"
                    f"{'s' if count != 1 else ''} hold)")
    else:
        text.append("FAIL", style="bold red")
        failed = len(verdict.failures)
        text.append(f"  {result.name}  ({result.source}: {failed} of {len(verdict.outcomes)} "
                    "checks failed)")
    return text


def render_table(results: Sequence[ScenarioResult], console: Console,
                 verdicts: Sequence[Verdict] | None = None) -> None:
    """Every scenario (with its expectations' verdict, if any), then the flag legend."""
    for i, result in enumerate(results):
        render_scenario(result, console)
        if verdicts is not None and verdicts[i].outcomes:
            render_verdict(result, verdicts[i], console)
            console.print()
    console.print(LEGEND, style="dim")


def render_limits_table(rows: Sequence[LimitRow], console: Console) -> None:
    """The ``limits`` command: bisected edges with their closed forms, per dtype."""
    if not rows:
        return
    console.print(Text(f"Limits for {rows[0].classes} classes", style="bold"),
                  Text("(bisection on the pipeline itself; closed form from the format)",
                       style="dim"))
    table = Table(header_style="bold", pad_edge=False)
    for column in ("loss", "pipeline", "dtype", "safe logit ≥", "closed form", "safe logit ≤",
                   "closed form", "safe spread ≤", "closed form", "no subnormals", "agree"):
        table.add_column(column, justify="left" if column in ("loss", "pipeline", "dtype")
                         else "right")
    previous = None
    for row in rows:
        if previous is not None and row.dtype != previous:
            table.add_section()
        previous = row.dtype
        closed = row.closed_form
        found = row.bisected
        table.add_row(
            row.family, row.pipeline, row.dtype,
            _limit_value(found.smallest_safe_logit, row.dtype, found.no_safe_logit),
            _limit_value(closed.smallest_safe_logit if closed else None, row.dtype,
                         closed is not None and closed.no_safe_logit),
            _limit_value(found.largest_safe_logit, row.dtype, found.no_safe_logit),
            _limit_value(closed.largest_safe_logit if closed else None, row.dtype,
                         closed is not None and closed.no_safe_logit),
            _limit_value(found.largest_safe_spread, row.dtype, found.no_safe_spread),
            _limit_value(closed.largest_safe_spread if closed else None, row.dtype,
                         closed is not None and closed.no_safe_spread),
            _limit_value(row.spread_without_subnormals, row.dtype,
                         closed is not None and closed.no_safe_spread),
            Text("yes", style="green") if row.agrees else Text(
                "—" if closed is None else "NO", style="dim" if closed is None else "bold red"),
        )
    console.print(table)


def _limit_value(value: float | None, dtype: str, no_safe: bool = False) -> Text:
    if no_safe:
        return Text("no safe value", style="bold red")
    if value is None:
        return Text("—", style="dim")
    if abs(value) == Precision(dtype).max:
        return Text("format max" if value > 0 else "format min", style="dim")
    return Text(f"{value:.7g}")


SPARKS = "▁▂▃▄▅▆▇█"


def _sparkline(curve: SweepCurve, width: int) -> Text:
    worst, broken = downsample(curve, width)
    full = Precision(curve.dtype).mantissa_bits + 1  # every bit of D lost
    text = Text()
    for bits, bad in zip(worst, broken, strict=True):
        if bad:
            text.append("x", style="bold red")
            continue
        level = 0 if bits != bits else min(len(SPARKS) - 1, int(bits / full * len(SPARKS)))
        text.append(SPARKS[level], style="yellow" if level >= len(SPARKS) // 2 else "green")
    return text


def render_sweep_table(result: SweepResult, console: Console, width: int = 48) -> None:
    """Break points per pipeline and precision, and a terminal curve of bits lost."""
    spec = result.spec
    scale = "log-spaced" if spec.log_scale else "linear"
    console.print(Text(f"Sweep: {spec.family}, {spec.classes} classes, pattern {spec.pattern!r}, "
                       f"{spec.points} {scale} magnitudes {spec.start:g} … {spec.stop:g}",
                       style="bold"))
    table = Table(header_style="bold", pad_edge=False)
    for column in ("pipeline", "dtype", "not finite from", "inaccurate from",
                   "gradient not finite / inaccurate from",
                   f"bits of error  {spec.start:g} → {spec.stop:g}"):
        table.add_column(column)
    previous = None
    for curve in result.curves:
        if previous is not None and curve.dtype != previous:
            table.add_section()
        previous = curve.dtype
        table.add_row(
            curve.pipeline, curve.dtype,
            Text(_num(curve.first_nonfinite, 5), style="bold red")
            if curve.first_nonfinite is not None else Text("—", style="dim"),
            Text(_num(curve.first_inaccurate, 5), style="yellow")
            if curve.first_inaccurate is not None else Text("—", style="dim"),
            Text(f"{_num(curve.grad_first_nonfinite, 5)} / "
                 f"{_num(curve.grad_first_inaccurate, 5)}"),
            _sparkline(curve, width),
        )
    console.print(table)
    console.print("bits of error: log2(1 + ulps) against the loss of the inputs rounded to the "
                  "dtype (▁ exact … █ every bit lost); x = NaN or inf; 'inaccurate' = error "
                  "beyond the tolerance.", style="dim")
