"""The report for a person: one rich table per scenario. Renders findings; computes nothing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import PurePath

from rich.console import Console
from rich.text import Text

from .expectations import Verdict
from .findings import Finding, Mismatch, ScenarioResult
from .layout import Column, Row, fits, print_table, print_wrapped
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
# The legend's paragraphs, each wrapped at spaces to the terminal.
LEGEND = (
    "flags: nan/inf = the loss is NaN/infinite · overflow = a stage made ±inf from finite "
    "values · underflow = a value that matters was flushed to 0 or a subnormal · "
    "precision_loss = error beyond tolerance · input_rounding = rounding the inputs alone "
    "moves the loss beyond tolerance.",
    "gradient: max |g - g_ref| / max |g_ref| of d loss / d logits as autodiff of the "
    "formulation computes it (zeroed = entries flushed to 0 that should not be; the stage is "
    "the first the backward pass goes through that makes it bad).",
    "safe logit ≤: every input whose logits stay below it gives a finite loss (worst case: "
    "all C logits equal) · safe spread ≤: the same for the gap between a row's largest logit "
    "and its target's (every class's with one-hot/probability labels or label smoothing) · "
    "safe logit ≥: the lower edge, against the smallest logit whose probability is logged "
    "(naive exp underflowing to 0/0) · format max/min: no edge before the format's own "
    "range · no safe value: the worst case breaks at every magnitude (a sum of C equal "
    "terms is inf in D).",
)
PER_EXAMPLE_LEGEND = (
    "reduction none: 'loss at [i]' is every row's loss at the one example i where the "
    "pipelines are farthest from the reference; the errors are each row's largest over all "
    "examples, 'worst at' the example of its largest ulp error."
)
LABEL_KINDS = {"index": "integer labels", "dense": "one-hot/probability labels",
               "binary": "binary targets"}


def _num(value: float | None, digits: int = 6) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}"


def _index(index: Sequence[int] | None) -> str:
    """An example or element index as one word (``[0,3]``): a narrow cell wraps at spaces."""
    return "—" if index is None else "[" + ",".join(str(i) for i in index) + "]"


def _loss_text(finding: Finding, focus: tuple[int, ...] | None) -> Text:
    """The loss, or for ``reduction: none`` the loss at the scenario's focus example (the
    same example on every row)."""
    value = finding.loss
    if value is None and finding.per_example is not None and focus is not None:
        value = float(finding.per_example[focus])
    text = Text(_num(value, 9))
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
    where = f" at {_index(event.index)}" if event.index else ""
    # a user's function: the line of their file that called the op
    line = f" in {event.source}" if event.source else ""
    return Text(f"{event.stage}: {event.kind}{where}{line}",
                style="red" if event.kind != "underflow" else "yellow")


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
        where = f" {_index(event.index)}" if event.index else ""
        line = f" in {event.source}" if event.source else ""
        text.append(f" @{event.stage}{where}{line}", style="red")
    elif "nan" not in flags:
        text.append(f" err {_num(finding.grad_error, 2)}")
    return text


def _limit_text(limit: float | None, headroom: float | None, dtype: str, *,
                no_safe: bool = False) -> Text:
    """An edge with its headroom, or that no value is safe."""
    if no_safe:
        return Text("no safe value", style="bold red")
    return _edge_text(limit, headroom, dtype)


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
    """One disagreement, quoting the values the table (at the focus example) or the JSON
    report's ``per_example`` (at the example named) holds."""
    a, b = m.pipelines
    la, lb = (_num(v, 9) for v in m.losses)
    where = f"{m.dtype}" if m.index is None else f"{m.dtype} at example {_index(m.index)}"
    if m.kind == "finiteness":
        return f"{where}: {a} gives {la} but {b} gives {lb} (one finite, the other not)"
    return f"{where}: {a} gives {la} and {b} gives {lb}, {_num(m.difference, 3)} apart"


def _title(result: ScenarioResult) -> Text:
    """The scenario's name and where it came from, each once (``--logits lm.npy`` names the
    scenario after its file)."""
    title = Text(result.name, style="bold")
    if result.source and result.source != result.name \
            and PurePath(result.source).name != result.name:
        title.append(" ")
        title.append(result.source, style="dim")
    elif result.source and result.source != result.name:
        title = Text(result.source, style="bold")
    return title


def _reference_line(result: ScenarioResult) -> str:
    ref = result.reference
    focus = result.focus_index
    if ref.loss is not None:
        reference = f"reference loss {ref.loss:.17g}"
    elif focus is not None and ref.per_example is not None:
        reference = (f"reference loss at example {_index(focus)}: "
                     f"{float(ref.per_example[focus]):.17g} (the example where the pipelines "
                     "are farthest from the reference)")
    else:
        reference = "reference loss per example (reduction none)"
    stats = result.stats
    largest = "largest |logit|" if result.family == "sigmoid" else "largest logit"
    line = f"{reference} · input {stats.input_dtype}: {largest} " + _num(
        stats.max_abs_logit if result.family == "sigmoid" else stats.max_logit
    )
    if stats.max_spread is not None:
        line += f", largest spread (row max - target logit) {_num(stats.max_spread)}"
    return line


def _header(result: ScenarioResult, console: Console) -> None:
    print_wrapped(console, _title(result), 0, 2)
    if result.description:
        print_wrapped(console, result.description, 2)
    kind = LABEL_KINDS.get(result.label_kind, result.label_kind)
    inputs = "logits" if result.from_logits else "probabilities"
    print_wrapped(
        console,
        f"{result.family} cross-entropy from {inputs}, {kind} · shape "
        f"{_index(result.shape)} · {result.classes} class"
        f"{'es' if result.classes != 1 else ''} · reduction {result.reduction}", 2)
    print_wrapped(console, _reference_line(result), 2)
    if result.class_weights is not None:
        weights = ", ".join(_num(w, 4) for w in result.class_weights)
        print_wrapped(console, f"class weights: [{weights}]", 2, 4)


def _findings_columns(result: ScenarioResult) -> list[Column]:
    per_example = result.reduction == "none"
    loss = f"loss at {_index(result.focus_index)}" if per_example else "loss"
    columns = [Column("pipeline", key=True), Column("dtype", key=True),
               Column(loss, "right")]
    if per_example:
        columns.append(Column("worst at", "right"))
    columns += [Column("abs err", "right"), Column("rel err", "right"),
                Column("ulp err", "right"), Column("flags"), Column("first bad stage"),
                Column("gradient")]
    lower_edges = _shows_lower_edges(result)
    if lower_edges:
        columns.append(Column("safe logit ≥"))
    columns += [Column("safe logit ≤", follows=lower_edges),
                Column("safe spread ≤", follows=True)]
    return columns


def _has_lower_edge(f: Finding) -> bool:
    lower = f.limit.smallest_safe_logit
    return lower is not None and lower != -Precision(f.dtype).max and not f.limit.no_safe_logit


def _shows_lower_edges(result: ScenarioResult) -> bool:
    """Whether any pipeline here has a lower edge (naive softmax, naive sigmoid): only then
    does the table carry the column."""
    return any(_has_lower_edge(f) for f in result.findings)


def _findings_rows(result: ScenarioResult) -> list[Row]:
    rows = []
    previous = None
    lower_edges = _shows_lower_edges(result)
    for f in result.findings:
        default = Precision(f.dtype).accumulate_label == f.accumulate
        dtype = f.dtype if default else f"{f.dtype} (acc {f.accumulate})"
        cells = [Text(f.pipeline), Text(dtype), _loss_text(f, result.focus_index)]
        if result.reduction == "none":
            cells.append(Text(_index(f.worst_index)))
        cells += [
            Text(_num(f.abs_error, 3)), Text(_num(f.rel_error, 3)), Text(_num(f.ulp_error, 3)),
            _flags_text(f.flags), _first_bad(f), _gradient_text(f),
        ]
        if lower_edges:
            # where no logit is safe at all, the upper edge's cell says so, once
            cells.append(Text("—", style="dim") if f.limit.no_safe_logit else _limit_text(
                f.limit.smallest_safe_logit, f.lower_logit_headroom, f.dtype))
        cells += [
            _limit_text(f.limit.largest_safe_logit, f.logit_headroom, f.dtype,
                        no_safe=f.limit.no_safe_logit),
            _limit_text(f.limit.largest_safe_spread, f.spread_headroom, f.dtype,
                        no_safe=f.limit.no_safe_spread),
        ]
        rows.append(Row(cells, new_section=previous is not None and f.dtype != previous))
        previous = f.dtype
    return rows


def render_scenario(result: ScenarioResult, console: Console) -> None:
    """One scenario: header, misuse warnings, findings table, input-rounding notes,
    mismatches."""
    _header(result, console)
    for warning in result.warnings:
        print_wrapped(console, f"warning {warning.rule} {warning.name}: {warning.message} "
                      f"(xentcheck explain {warning.rule})", 2, 4, style="bold yellow")
    print_table(console, _findings_columns(result), _findings_rows(result))
    ref = result.reference
    changed = [
        f"{dtype} {rounded:.9g}" for dtype, rounded in ref.rounded.items()
        if ref.loss is not None and rounded is not None and rounded != ref.loss
    ]
    if changed and ref.loss is not None:
        print_wrapped(
            console, f"loss of the inputs rounded to: {' · '.join(changed)} (reference "
            f"{ref.loss:.9g}; the rest of each error is arithmetic)", 2, 4, style="cyan")
    frameworks = {f.pipeline for f in result.findings if f.framework}
    # a framework's disagreements are told in its own lines below, not pair by pair
    textbook = [m for m in result.mismatches if not frameworks & set(m.pipelines)]
    if textbook:
        console.print("  mismatches between pipelines:", style="bold")
        for m in textbook:
            print_wrapped(console, _mismatch_line(m), 2, 4)
    if result.frameworks:
        _render_frameworks(result, console)
    console.print()


def _render_frameworks(result: ScenarioResult, console: Console) -> None:
    """Per dtype: each framework's answer, whether it is the reference's (✓) or not (✗),
    and which other frameworks answer differently."""
    reference = result.frameworks[0].reference
    where = "" if result.focus_index is None else f" at example {_index(result.focus_index)}"
    console.print(f"  frameworks against the reference{where} ({_num(reference, 9)}):",
                  style="bold")
    for comparison in result.frameworks:
        line = Text(f"{comparison.dtype}: ")
        for i, answer in enumerate(comparison.answers):
            if i:
                line.append(" · ")
            line.append(f"{answer.pipeline} {_num(answer.loss, 9)} ")
            line.append("✓" if answer.agrees_with_reference else "✗",
                        style="green" if answer.agrees_with_reference else "bold red")
            if answer.differs_from:
                line.append(f" (differs from {', '.join(answer.differs_from)})",
                            style="yellow")
        print_wrapped(console, line, 2, 4)


def render_verdict(result: ScenarioResult, verdict: Verdict, console: Console) -> None:
    """One line per scenario: pass, or fail with each failed expectation and its line."""
    print_wrapped(console, verdict_line(result, verdict), 0, 6)
    for outcome in verdict.failures:
        where = f"{result.source}:{outcome.expectation.line}" if outcome.expectation.line \
            else outcome.expectation.origin
        print_wrapped(console, f"{where}: {outcome.message}", 6, 8, style="red")


def verdict_line(result: ScenarioResult, verdict: Verdict) -> Text:
    text = Text()
    if verdict.unchecked:
        # it ran, and there was nothing to hold: not a pass of "0 checks"
        text.append("RAN ", style="bold")
        text.append(f"  {result.name}  ({result.source}: {verdict.unchecked})")
    elif verdict.passed:
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
    if any(r.reduction == "none" for r in results):
        print_wrapped(console, PER_EXAMPLE_LEGEND, 0, 2, style="dim")
    for paragraph in LEGEND:
        print_wrapped(console, paragraph, 0, 2, style="dim")


def render_limits_table(rows: Sequence[LimitRow], console: Console) -> None:
    """The ``limits`` command: bisected edges with their closed forms, per dtype."""
    if not rows:
        return
    title = Text(f"Limits for {rows[0].classes} classes", style="bold")
    title.append(" (bisection on the pipeline itself; closed form from the format)",
                 style="dim")
    print_wrapped(console, title, 0, 2)
    keys = ("loss", "pipeline", "dtype")
    columns = [Column(name, key=True) for name in keys] + [
        Column(name, "right", follows=name == "closed form")
        for name in ("safe logit ≥", "closed form", "safe logit ≤", "closed form",
                     "safe spread ≤", "closed form", "no subnormals", "agree")]
    table: list[Row] = []
    previous = None
    for row in rows:
        new_section = previous is not None and row.dtype != previous
        previous = row.dtype
        closed = row.closed_form
        found = row.bisected
        cells = (
            Text(row.family), Text(row.pipeline), Text(row.dtype),
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
        table.append(Row(cells, new_section))
    print_table(console, columns, table)


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


CURVE_WIDTH = 48  # the sparkline's widest; narrower terminals get a shorter one
CURVE_NARROWEST = 8  # below this the curve goes on its own line under its label


def _sweep_columns_rows(result: SweepResult) -> tuple[list[Column], list[Row]]:
    columns = [Column("pipeline", key=True), Column("dtype", key=True),
               Column("not finite from"), Column("inaccurate from"),
               Column("gradient not finite / inaccurate from")]
    rows = []
    previous = None
    for curve in result.curves:
        new_section = previous is not None and curve.dtype != previous
        previous = curve.dtype
        rows.append(Row((
            Text(curve.pipeline), Text(curve.dtype),
            Text(_num(curve.first_nonfinite, 5), style="bold red")
            if curve.first_nonfinite is not None else Text("—", style="dim"),
            Text(_num(curve.first_inaccurate, 5), style="yellow")
            if curve.first_inaccurate is not None else Text("—", style="dim"),
            Text(f"{_num(curve.grad_first_nonfinite, 5)} / "
                 f"{_num(curve.grad_first_inaccurate, 5)}"),
        ), new_section))
    return columns, rows


def _axis(start: str, stop: str, width: int) -> str:
    """The curve's x axis: the first magnitude under its left end, the last under its right
    end (or both in a phrase where the curve is too short to hold them apart)."""
    if len(start) + len(stop) + 1 > width:
        return f"{start} to {stop}"
    return start + " " * (width - len(start) - len(stop)) + stop


def _print_curves(result: SweepResult, console: Console) -> None:
    """The bits-of-error curves under the table, as wide as the terminal allows, each
    after its pipeline and dtype, with the magnitudes of both ends on the axis."""
    spec = result.spec
    start, stop = f"{spec.start:g}", f"{spec.stop:g}"
    label = max(len(f"{c.pipeline} {c.dtype}") for c in result.curves)
    width = min(CURVE_WIDTH, console.width - label - 2)
    beside = width >= CURVE_NARROWEST
    if not beside:
        width = min(CURVE_WIDTH, console.width - 2)
    console.print()
    print_wrapped(console, f"bits of error, magnitude {start} to {stop}:", 0, 2, style="bold")
    indent = label + 2 if beside else 2
    console.print(" " * indent + _axis(start, stop, width), style="dim", soft_wrap=True)
    for curve in result.curves:
        name = f"{curve.pipeline} {curve.dtype}"
        if beside:
            console.print(Text(name.ljust(label + 2)) + _sparkline(curve, width),
                          soft_wrap=True)
        else:
            console.print(name)
            console.print(Text("  ") + _sparkline(curve, width), soft_wrap=True)


def render_sweep_table(result: SweepResult, console: Console) -> None:
    """Break points per pipeline and precision, and a terminal curve of bits lost: in the
    table where it fits at full width, else under it, shortened to the terminal."""
    spec = result.spec
    scale = "log-spaced" if spec.log_scale else "linear"
    print_wrapped(console, f"Sweep: {spec.family}, {spec.classes} classes, pattern "
                  f"{spec.pattern!r}, {spec.points} {scale} magnitudes {spec.start:g} to "
                  f"{spec.stop:g}", 0, 2, style="bold")
    columns, rows = _sweep_columns_rows(result)
    curve_column = Column(f"bits of error  {spec.start:g} → {spec.stop:g}")
    with_curves = [Row((*row.cells, _sparkline(curve, CURVE_WIDTH)), row.new_section)
                   for row, curve in zip(rows, result.curves, strict=True)]
    if fits([*columns, curve_column], with_curves, console.width):
        print_table(console, [*columns, curve_column], with_curves)
    else:
        print_table(console, columns, rows)
        _print_curves(result, console)
    print_wrapped(console, "bits of error: log2(1 + ulps) against the loss of the inputs "
                  "rounded to the dtype (▁ exact to █ every bit lost); x = NaN or inf; "
                  "'inaccurate' = error beyond the tolerance.", 0, 2, style="dim")
