"""``run``'s inputs: scenario files, or logits and labels given as files on the command
line (``--logits``, ``--labels``, ``--label-column`` ...), as scenarios to evaluate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from .arrays import load_array, load_csv_with_labels
from .case import DEFAULT_CHUNK_SIZE, LossOptions
from .case_validation import make_case
from .scenario import Scenario, load_scenarios


@dataclass(frozen=True)
class InputFiles:
    """``run``'s --logits/--labels options."""

    logits: Path | None
    logits_key: str | None
    logits_dtype: str | None
    labels: Path | None
    labels_key: str | None
    labels_dtype: str | None
    label_column: str | None

    def given(self) -> list[str]:
        """The options given, as written on the command line."""
        return [f"--{name.replace('_', '-')}" for name, value in vars(self).items()
                if value is not None]


# ``run``'s options that describe the loss of --logits; a scenario file says it with keys,
# and a value given for a scenario file would otherwise be silently ignored
LOSS_PARAMETERS = ("loss", "probabilities", "reduction", "ignore_index", "label_smoothing")


def _given_on_command_line(names: tuple[str, ...]) -> list[str]:
    """Of the current command's parameters ``names``, those the user gave (on the command
    line or through the environment), as flags; none outside a click command."""
    context = click.get_current_context(silent=True)
    if context is None:
        return []
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return [f"--{name.replace('_', '-')}" for name in names
            if context.get_parameter_source(name) in given]


def input_scenarios(
    paths: tuple[Path, ...], files: InputFiles, loss: str,
    probabilities: bool, reduction: str, ignore_index: int | None, label_smoothing: float,
    options: LossOptions,
    chunk_size: int | None = None,
) -> list[Scenario]:
    """The scenario files under ``paths``, or one scenario from the --logits/--labels
    ``files`` and the loss options; a combination that does not fit is a usage error."""
    logits_file, labels_file = files.logits, files.labels
    if paths and files.given():
        raise click.UsageError(f"give scenario files or {files.given()[0]}, not both")
    if not paths and logits_file is None:
        if files.given():
            raise click.UsageError(f"{files.given()[0]} needs --logits FILE")
        raise click.UsageError("give a scenario file, or --logits FILE (and --labels FILE)")
    if logits_file is None:
        given = [flag for flag, value in (("--z-loss", options.z_loss),
                                          ("--logit-softcap", options.logit_softcap),
                                          ("--temperature", options.temperature != 1.0),
                                          ("--chunk-size", chunk_size is not None))
                 if value] + _given_on_command_line(LOSS_PARAMETERS)
        if given:
            raise click.UsageError(f"{given[0]} applies to --logits; a scenario file gives "
                                   "the loss options as keys")
        return [s for path in paths for s in load_scenarios(path)]
    source = "<command line>"
    if files.label_column is not None:
        if labels_file is not None:
            raise click.UsageError("give --labels or --label-column, not both")
        unused = [o for o in files.given() if o not in ("--logits", "--label-column")]
        if unused:
            raise click.UsageError(f"{unused[0]} does not apply to --label-column (the logits "
                                   "and labels are numbers in one .csv file)")
        logits, labels = load_csv_with_labels(logits_file, files.label_column, source=source,
                                              field="--label-column")
    elif labels_file is None:
        unused = [o for o in files.given() if o.startswith("--labels-")]
        if unused:
            raise click.UsageError(f"{unused[0]} needs --labels FILE")
        raise click.UsageError("--logits needs --labels FILE (or --label-column for a .csv)")
    else:
        logits = load_array(logits_file, key=files.logits_key, source=source, field="--logits",
                            dtype=files.logits_dtype, option="--logits")
        labels = load_array(labels_file, key=files.labels_key, source=source, field="--labels",
                            dtype=files.labels_dtype, option="--labels")
    case = make_case(
        name=logits_file.name, logits=logits, labels=labels,
        family=loss, from_logits=not probabilities, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, source=str(logits_file),
        z_loss=options.z_loss, logit_softcap=options.logit_softcap,
        temperature=options.temperature,
        chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
    )
    return [Scenario(case, None, None, None, str(logits_file), {})]
