"""Which pipelines and precisions a command runs (named ones, the defaults, the user's
functions beside them), and the evaluation of scenarios with them, judged against their
expectations and the ``--fail-on`` rules."""

from __future__ import annotations

from collections.abc import Sequence

import click

from . import execution
from .cli_functions import with_functions
from .cli_options import precisions_from, split_names
from .cli_output import note, progress_bar
from .errors import UsageError
from .evaluator import evaluate, left_out
from .expectations import Checked, parse_fail_on
from .expectations import check as check_expectations
from .findings import ScenarioResult, Tolerance
from .pipelines import Pipeline, available, select
from .precision import DEFAULT_DTYPES, Precision
from .scenario import Scenario, ToleranceSpec
from .user_functions.loading import UserFunction


def check_all(
    loaded: Sequence[Scenario], dtypes: tuple[str, ...], pipelines: tuple[str, ...],
    accumulate: str, rtol: float | None, atol: float | None, fail_on: tuple[str, ...],
    functions: Sequence[UserFunction] = (),
) -> list[Checked]:
    """Evaluate each scenario (with the --loss-fn ``functions`` beside its own) and judge
    its expectations and the --fail-on rules."""
    rules = parse_fail_on(fail_on)
    override = None
    if rtol is not None or atol is not None:
        override = ToleranceSpec(everywhere=Tolerance(rel=rtol or 0.0, abs=atol or 0.0))
    checked = []
    for scenario in loaded:
        result = _evaluate(scenario, split_names(dtypes), split_names(pipelines), accumulate,
                           override, functions)
        expectations = (*scenario.expectations, *rules)
        verdict = check_expectations(result, expectations)
        checked.append(Checked(result, verdict, expectations))
    return checked


def _evaluate(scenario: Scenario, dtypes: list[str], pipelines: list[str], accumulate: str,
              override: ToleranceSpec | None,
              functions: Sequence[UserFunction] = ()) -> ScenarioResult:
    case = scenario.case
    precisions = precisions_from(dtypes, scenario.dtypes or DEFAULT_DTYPES, accumulate)
    named = pipelines or list(scenario.pipelines or ())
    chosen = select(case.spec.family, case.spec.from_logits, named)
    refuse_named_pairs(chosen, precisions, bool(named), bool(dtypes or scenario.dtypes),
                       case.source)
    if not named and case.classes > execution.BLOCK_ELEMENTS:
        # a row this wide runs in column chunks, bounded in memory; a default pipeline that
        # cannot replay over chunks would hold the whole row: it runs only when named
        whole = [p.name for p in chosen if not p.splittable]
        chosen = tuple(p for p in chosen if p.splittable)
        if whole:
            click.echo(f"xentcheck: note: {case.source}: {', '.join(whole)} left out of the "
                       f"default set for rows of {case.classes} classes (it would hold a whole "
                       f"row in memory); name it with --pipeline to run it", err=True)
    chosen = with_functions(chosen, (*scenario.functions, *functions), case.spec.family,
                            case.spec.from_logits, case.logits.ndim)
    spec = override or scenario.tolerance
    tolerances = None
    if spec is not None:
        tolerances = {
            p.name: spec.for_dtype(p.name, Tolerance(rel=p.default_rel_tolerance()))
            for p in precisions
        }
    with progress_bar(case, len(precisions) * len(chosen)) as progress:
        result = evaluate(case, precisions, chosen, tolerances, progress)
    for item in result.left_out:
        note(f"{case.source}: {item.pipeline} left out in {item.dtype}: {item.reason}")
    return result


def refuse_named_pairs(pipelines: Sequence[Pipeline], precisions: Sequence[Precision],
                       pipelines_named: bool, dtypes_named: bool, source: str) -> None:
    """A pipeline that does not run in a dtype (a framework in float8) is left out with a
    note, unless both were named: then it is a usage error."""
    if not (pipelines_named and dtypes_named):
        return
    for item in left_out(pipelines, precisions):
        raise UsageError(f"{source}: {item.pipeline} does not run in {item.dtype}: "
                         f"{item.reason}")


def limit_pipelines(families: Sequence[str], names: list[str]) -> list[Pipeline]:
    """The pipelines on logits named (those run by default when none is), in each family
    that has them; a name no family has is an error."""
    if not names:
        return [p for family in families for p in select(family, True, None)]
    chosen = [p for family in families for p in available(family, True, every=True)
              if p.name in names]
    unknown = [n for n in names if n not in {p.name for p in chosen}]
    if unknown:
        known = sorted({p.name for f in families for p in available(f, True, every=True)})
        raise UsageError(f"unknown pipeline {unknown[0]!r} on logits; choose from "
                         f"{', '.join(known)}")
    order = {name: i for i, name in enumerate(dict.fromkeys(names))}
    return sorted(chosen, key=lambda p: (families.index(p.family), order[p.name]))
