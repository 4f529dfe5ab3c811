"""Misuse checks: inputs that are valid numbers but probably not what the user meant.

Each rule has an id (like a linter's), a short name, and an explanation with the fix,
printed by ``xentcheck explain RULE``. Rules whose inputs cannot be evaluated at all
(labels outside ``[0, C)``, label rows that are not distributions) are input errors whose
message carries the rule id; the others are warnings shown before the findings and listed
in the JSON report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .case import Case
from .errors import UsageError
from .findings import InputStats, MaskedInputs, MisuseWarning
from .pipelines import Block

# One-hot labels over at least this many classes are worth replacing by integer ids.
LARGE_VOCABULARY = 1024
# Rows whose sum is within this of 1 "sum to 1" (as the evaluator's statistics judge it).
SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    summary: str
    explanation: str


RULES: dict[str, Rule] = {rule.id: rule for rule in (
    Rule("XC101", "probabilities-as-logits",
         "the logits look like probabilities (all in [0, 1], rows summing to 1)",
         "from_logits is true, but every row is already a probability distribution: softmax "
         "of probabilities squashes them towards uniform, so the loss barely moves and the "
         "gradients vanish. If the model ends in a softmax, set from_logits: false (or "
         "--probabilities), or better, drop the softmax and pass its input as logits."),
    Rule("XC102", "logits-as-probabilities",
         "probability inputs hold values outside [0, 1]: they look like logits",
         "from_logits is false, so the inputs must be probabilities, but some are negative or "
         "above 1: these are logits. Set from_logits: true (or drop --probabilities)."),
    Rule("XC103", "unnormalised-probabilities",
         "probability rows do not sum to 1; they are renormalised (as Keras does)",
         "With from_logits: false each softmax row is divided by its sum before the log. "
         "Rows far from summing to 1 usually mean the wrong axis, a missing softmax, or "
         "probabilities of a sigmoid model passed to a softmax loss."),
    Rule("XC201", "label-out-of-range",
         "integer labels outside [0, C) that are not the ignore_index",
         "Frameworks index the log-probabilities with the label: an id of C or more reads "
         "past the row (a CUDA assert, or garbage and NaN). Padded language-model batches are "
         "the usual cause: set ignore_index to the padding id (PyTorch's default is -100)."),
    Rule("XC202", "labels-not-distributions",
         "one-hot or probability label rows that hold negatives or do not sum to 1",
         "Soft labels must be distributions: non-negative rows summing to 1. Otherwise the "
         "loss is not a cross-entropy (it can be negative, or scale with the row sum)."),
    Rule("XC203", "masked-target",
         "an example's loss weighs a masked (-inf) logit: its loss is inf",
         "A -inf logit masks its class (a padded vocabulary entry, a token constrained "
         "decoding rules out): its probability is exactly 0, so an example whose target is "
         "masked, or whose one-hot/soft label puts weight on a masked class, has an infinite "
         "loss, in every framework. Label smoothing puts weight on every class, masked ones "
         "included. Make the mask and the labels agree (the gold token must stay allowed), "
         "smooth only over the unmasked classes, or set such rows to the ignore_index."),
    Rule("XC204", "all-masked-row",
         "every logit of a row is masked (-inf): softmax is 0/0",
         "With every entry -inf, softmax is 0/0 and the loss is NaN, in the frameworks as "
         "here (the reference is NaN too). Even when the row's label is the ignore_index, "
         "PyTorch's gradient of that row is NaN (log_softmax's backward multiplies a 0 by a "
         "NaN) and reaches the model's weights. Padding rows need at least one finite logit "
         "(mask with a large negative number, not -inf, or drop the rows before the loss)."),
    Rule("XC301", "single-class-softmax",
         "softmax over a single class: the loss is identically 0",
         "softmax of one logit is 1 whatever the logit, so the loss is 0 and nothing is "
         "learned. A binary problem with one output unit needs the sigmoid loss "
         "(loss: sigmoid / BCEWithLogits)."),
    Rule("XC302", "sigmoid-on-softmax-outputs",
         "sigmoid/binary cross-entropy on rows that sum to 1 (softmax outputs)",
         "Binary cross-entropy treats every element as its own yes/no problem. Applied to an "
         "N-way softmax's output it is not the N-way loss (twice it for N = 2, meaningless "
         "beyond). Use the softmax cross-entropy for mutually exclusive classes."),
    Rule("XC401", "one-hot-large-vocabulary",
         "one-hot labels over a large vocabulary",
         "One-hot labels take C numbers per example where one integer id would do: for a "
         "language model's vocabulary that is most of the labels' memory. Pass integer ids "
         "(SparseCategoricalCrossentropy, or F.cross_entropy with class indices)."),
)}


def tagged(rule: str, message: str) -> str:
    """An input error's message with the rule it breaks, for ``xentcheck explain``."""
    return f"{message} [{rule} {RULES[rule].name}; see: xentcheck explain {rule}]"


def _warning(rule: str, message: str) -> MisuseWarning:
    return MisuseWarning(rule, RULES[rule].name, message)


def check_case(case: Case, stats: InputStats) -> tuple[MisuseWarning, ...]:
    """The warning rules that apply to a valid case, judged from its statistics (gathered
    in the evaluator's single pass over the input)."""
    found: list[MisuseWarning] = []
    spec = case.spec
    if spec.family == "softmax":
        if case.classes == 1:
            found.append(_warning("XC301", "one class: softmax is 1 and the loss is 0"))
        elif spec.from_logits and stats.rows_sum_to_one:
            found.append(_warning("XC101", "every logit is in [0, 1] and every row sums to 1: "
                                           "a softmax output passed with from_logits: true?"))
        elif not spec.from_logits and not stats.rows_sum_to_one:
            found.append(_warning("XC103", "probability rows do not all sum to 1 (within "
                                           f"{SUM_TOLERANCE:g}); they are renormalised"))
        if case.label_kind == "dense" and case.classes >= LARGE_VOCABULARY:
            dense = int(case.labels.nbytes)
            ids = case.rows * 8
            found.append(_warning("XC401", f"one-hot labels over {case.classes} classes take "
                                           f"{_size(dense)}; integer ids would take "
                                           f"{_size(ids)}"))
    elif stats.rows_sum_to_one:
        found.append(_warning("XC302", "every row sums to 1, like a softmax output; binary "
                                       "cross-entropy treats each element on its own"))
    found += _masked_warnings(case, stats.masked)
    return tuple(found)


def _masked_warnings(case: Case, masked: MaskedInputs) -> list[MisuseWarning]:
    found = []
    if masked.weighted and masked.first_weighted is not None:
        row, column = masked.first_weighted
        smoothing = " (label smoothing weighs every class)" if case.spec.label_smoothing else ""
        if case.spec.family == "sigmoid":
            where = [*case.unravel_row(row), *([] if case.logits.ndim == 1 else [column])]
            found.append(_warning("XC203", f"{_count(masked.weighted, 'positive target')} at "
                                           f"a masked (-inf) logit (the first at index "
                                           f"{where}): loss inf"))
        else:
            found.append(_warning("XC203", f"{_count(masked.weighted, 'example')} weighing a "
                                           f"masked (-inf) class{smoothing} (the first: row "
                                           f"{list(case.unravel_row(row))}, class {column}): "
                                           "loss inf"))
    if masked.rows and masked.first_row is not None:
        row_index = list(case.unravel_row(masked.first_row))
        found.append(_warning("XC204", f"{_count(masked.rows, 'row')} with every logit masked "
                                       f"(-inf) (the first at index {row_index}): loss NaN"))
    if masked.ignored_rows:
        found.append(_warning("XC204", f"{_count(masked.ignored_rows, 'ignored row')} with "
                                       "every logit masked (-inf): no loss, but PyTorch's "
                                       "gradient there is NaN"))
    return found


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def masked_inputs(block: Block) -> MaskedInputs:
    """Count a block's masked entries and the rows they decide (positions in the input)."""
    masked = block.masked
    if masked is None:
        return MaskedInputs()
    case = block.case
    entries = int(np.count_nonzero(masked))
    if case.spec.family == "sigmoid":
        weight = np.asarray(block.labels, dtype=np.float64)
        if case.spec.pos_weight is not None:
            weight = weight * block.per_class(case.spec.pos_weight).astype(np.float64)
        if case.spec.class_weights is not None:
            weight = weight * block.per_class(case.spec.class_weights).astype(np.float64)
        hit = masked & block.valid_elements & (weight > 0)
        first = _first(hit, block.start)
        if first is not None and block.columns is not None:  # a split row's chunk
            first = (*first[:-1], first[-1] + block.columns[0])
        return MaskedInputs(entries, int(np.count_nonzero(hit)), first)
    every = masked.all(axis=-1)
    counted = block.valid & ~every
    if case.label_kind == "index" and not case.spec.label_smoothing:
        weighs = block.target_mask
    else:
        weighs = block.softmax_coefficients() > 0
    hit = masked & weighs & counted[:, None]
    hit_rows = hit.any(axis=-1)
    first = _first(hit, block.start)  # (row, class)
    whole = every & block.valid
    first_row = _first(whole, block.start)
    return MaskedInputs(entries, int(np.count_nonzero(hit_rows)), first,
                        int(np.count_nonzero(whole)), None if first_row is None else first_row[0],
                        int(np.count_nonzero(every & ~block.valid)))


def _first(hit: np.ndarray, start: int) -> tuple[int, ...] | None:
    """The first True position, its row counted in the whole input."""
    if not hit.any():
        return None
    position = np.unravel_index(int(np.argmax(hit)), hit.shape)
    return (start + int(position[0]), *(int(p) for p in position[1:]))


def merge_masked(earlier: MaskedInputs, later: MaskedInputs) -> MaskedInputs:
    """The masked-entry statistics of two consecutive stretches of rows."""
    return MaskedInputs(
        earlier.entries + later.entries,
        earlier.weighted + later.weighted,
        earlier.first_weighted if earlier.first_weighted is not None else later.first_weighted,
        earlier.rows + later.rows,
        earlier.first_row if earlier.first_row is not None else later.first_row,
        earlier.ignored_rows + later.ignored_rows,
    )


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def explain(rule_id: str | None = None) -> str:
    """Every rule (id, name, summary), or one rule's explanation."""
    if rule_id is None:
        return "\n".join(f"{r.id}  {r.name:28}  {r.summary}" for r in RULES.values()) + "\n"
    by_name = {r.name: r for r in RULES.values()}
    rule = RULES.get(rule_id.upper()) or by_name.get(rule_id)
    if rule is None:
        raise UsageError(f"no rule {rule_id!r}; `xentcheck explain` lists them")
    return f"{rule.id} {rule.name}: {rule.summary}\n\n{rule.explanation}\n"
