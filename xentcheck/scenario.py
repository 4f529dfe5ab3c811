"""Scenario files: YAML in, validated Cases out.

One scenario per file, or a top-level ``scenarios:`` list. Keys are those of
docs/scenarios.md; an unknown key is an error with a suggestion, so a typo is never ignored. Only
``yaml.SafeLoader`` is used. Every problem is an :class:`InputError` naming the file and key.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import extrema
from .arrays import RAW_DTYPES, load_array, load_csv_with_labels, release_pages
from .case import FAMILIES, REDUCTIONS, Case, LabelKind, LossSpec
from .errors import InputError, UsageError, XentcheckError
from .expectations import Expectation, parse_expectations
from .findings import Tolerance
from .misuse import tagged
from .pipelines import available, select
from .precision import DTYPE_NAMES, FloatArray

KEYS: tuple[str, ...] = (
    "name", "description", "loss", "logits", "labels", "from_logits", "class_weights",
    "pos_weight", "label_smoothing", "ignore_index", "reduction", "dtypes", "pipelines",
    "tolerance", "expect",
)


# A YAML mapping with none of these keys is plainly something else (a CI workflow, a
# pre-commit config): a folder search skips it.
SCENARIO_MARKERS: tuple[str, ...] = ("logits", "labels", "scenarios")


class NotAScenario(XentcheckError):
    """A YAML file found in a folder that is plainly not a scenario (see ``load_scenarios``)."""


@dataclass(frozen=True)
class ToleranceSpec:
    """Tolerances a scenario or the command line asks for: for every dtype, or per dtype."""

    everywhere: Tolerance | None = None
    per_dtype: Mapping[str, Tolerance] = field(default_factory=dict)

    def for_dtype(self, name: str, default: Tolerance) -> Tolerance:
        return self.per_dtype.get(name) or self.everywhere or default


@dataclass(frozen=True)
class Scenario:
    """A validated scenario: the case and how to run it (None: the defaults)."""

    case: Case
    dtypes: tuple[str, ...] | None
    pipelines: tuple[str, ...] | None
    tolerance: ToleranceSpec | None
    source: str
    lines: dict[str, int]
    expectations: tuple[Expectation, ...] = ()


def load_scenarios(path: str | Path, *, found: bool = False) -> list[Scenario]:
    """Read and validate every scenario in a YAML file.

    Parameters
    ----------
    path
        The YAML file.
    found
        The file was found in a folder rather than named: if it is plainly not a scenario
        (not a mapping, or a mapping with none of the keys ``logits``, ``labels``,
        ``scenarios``), raise :class:`NotAScenario` instead of an input error. A mapping
        with ``logits`` and a misspelt key is still a scenario, and still an error.

    Raises
    ------
    InputError
        For any problem with the file or a scenario in it.
    NotAScenario
        Only with ``found``.
    """
    source = str(path)
    file = Path(path)
    if not file.exists():
        raise InputError("no such file", source=source)
    if file.is_dir():
        raise InputError("is a directory; give a scenario .yaml file", source=source)
    node, data = read_yaml(file, source)
    if found and not (isinstance(data, dict) and any(k in data for k in SCENARIO_MARKERS)):
        raise NotAScenario(f"{source}: not a scenario (none of the keys "
                           f"{', '.join(SCENARIO_MARKERS)})")
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise InputError("expected a mapping of scenario keys (or a 'scenarios:' list)",
                         source=source)
    if "scenarios" in data:
        if set(data) != {"scenarios"}:
            extra = sorted(set(data) - {"scenarios"})[0]
            raise InputError("a file with 'scenarios:' holds nothing else", source=source,
                             field=str(extra))
        entries, entry_nodes = data["scenarios"], _value_node(node, "scenarios")
        if not isinstance(entries, list) or not entries:
            raise InputError("must be a non-empty list of scenarios", source=source,
                             field="scenarios")
        assert isinstance(entry_nodes, yaml.SequenceNode)
        return [
            _scenario(entry, entry_node, file, source, f"{file.stem}[{i}]")
            for i, (entry, entry_node) in enumerate(zip(entries, entry_nodes.value, strict=True))
        ]
    return [_scenario(data, node, file, source, file.stem)]


MERGE_TAG = "tag:yaml.org,2002:merge"


class ScenarioLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (safe types only) that refuses a key given twice in a mapping.

    PyYAML keeps the last of two equal keys, so ``labels:`` written twice silently replaces
    the first. Keys brought in by a ``<<`` merge may still be overridden: that is what a
    merge is for.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
                continue  # a merge may be overridden; other keys are the base class's affair
            key = self.construct_object(key_node, deep=False)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise InputError(f"duplicate key (first given on line {seen[key]}); "
                                 "each key may appear once in a mapping",
                                 field=f"{key} (line {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(file: Path, source: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for line numbers) and its data, safe-loaded once."""
    try:
        text = file.read_text(encoding="utf-8")
        loader = ScenarioLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except UnicodeDecodeError:
        raise InputError("not a text file", source=source) from None
    except InputError as exc:
        raise exc.located(source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{where}not valid YAML ({problem})", source=source) from None
    return node, data


def _value_node(node: yaml.MappingNode, key: str) -> yaml.Node:
    return next(v for k, v in node.value if k.value == key)


def _scenario(data: Any, node: yaml.Node, file: Path, source: str, default_name: str) -> Scenario:
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise InputError("each scenario must be a mapping of keys", source=source)
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    # Named as written: YAML reads `on:` or `yes:` as the boolean True.
    for key_node, _ in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
        if key not in KEYS:
            hint = difflib.get_close_matches(str(key), KEYS, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise InputError(f"unknown key{suggestion} (keys: {', '.join(KEYS)})",
                             source=source, field=f"{key} (line {key_node.start_mark.line + 1})")
    for required in ("logits", "labels"):
        if required not in data:
            raise InputError("is required", source=source, field=required)
    try:
        base = file.parent
        if isinstance(data["labels"], dict) and set(data["labels"]) == {"column"}:
            # labels: {column: NAME}: a column of the logits' CSV file holds the labels
            if not isinstance(data["logits"], str):
                raise InputError("a label column needs logits given as a .csv path",
                                 field="labels")
            logits, labels = load_csv_with_labels(
                base / data["logits"], data["labels"]["column"], source=source,
                field="labels")
        else:
            logits = _array_field(data["logits"], base, "logits", source)
            labels = _array_field(data["labels"], base, "labels", source)
        case = make_case(
            name=_string(data.get("name", default_name), "name"),
            description=_string(data.get("description", ""), "description"),
            logits=logits,
            labels=labels,
            family=_choice(data.get("loss", "softmax"), FAMILIES, "loss"),
            from_logits=_boolean(data.get("from_logits", True), "from_logits"),
            class_weights=data.get("class_weights"),
            pos_weight=data.get("pos_weight"),
            label_smoothing=data.get("label_smoothing", 0.0),
            ignore_index=data.get("ignore_index"),
            reduction=_choice(data.get("reduction", "mean"), REDUCTIONS, "reduction"),
            source=source,
        )
        dtypes = _names(data.get("dtypes"), "dtypes")
        for name in dtypes or ():
            _choice(name, DTYPE_NAMES, "dtypes")
        pipelines = _names(data.get("pipelines"), "pipelines")
        if pipelines:
            try:
                select(case.spec.family, case.spec.from_logits, list(pipelines))
            except UsageError as exc:
                raise InputError(str(exc), field="pipelines") from None
        tolerance = parse_tolerance(data.get("tolerance"))
        expectations: tuple[Expectation, ...] = ()
        if "expect" in data:
            names = [p.name for p in available(case.spec.family, case.spec.from_logits,
                                                   every=True)]
            expectations = parse_expectations(data["expect"], _item_lines(node, "expect"), names)
    except InputError as exc:
        raise exc.located(source) from None
    return Scenario(case, dtypes, pipelines, tolerance, source, lines, expectations)


def _item_lines(node: yaml.MappingNode, key: str) -> list[int | None]:
    """1-based line of each item of a sequence value (for messages and CI annotations)."""
    value = _value_node(node, key)
    if not isinstance(value, yaml.SequenceNode):
        return []
    return [item.start_mark.line + 1 for item in value.value]


# -- field parsers ---------------------------------------------------------------------------


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise InputError("must be a string", field=key)
    return value


def _choice(value: Any, choices: tuple[str, ...], key: str) -> Any:
    if value not in choices:
        raise InputError(f"{value!r} is not one of {', '.join(choices)}", field=key)
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise InputError("must be true or false", field=key)
    return value


def _names(value: Any, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise InputError("must be a name or a non-empty list of names", field=key)
    return tuple(dict.fromkeys(items))


def _number(value: Any, key: str) -> float:
    # YAML's `yes`/`true` are bools, a subclass of int: refuse them as numbers.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"must be a number, not {value!r}", field=key)
    if not math.isfinite(value):
        raise InputError("must be finite", field=key)
    return float(value)


def parse_tolerance(value: Any) -> ToleranceSpec | None:
    """``1e-3`` | ``{rel: .., abs: ..}`` | ``{float16: <either form>, ...}``."""
    if value is None:
        return None
    if isinstance(value, dict) and value and set(value) <= set(DTYPE_NAMES):
        return ToleranceSpec(per_dtype={
            str(name): _tolerance(v, f"tolerance.{name}") for name, v in value.items()
        })
    return ToleranceSpec(everywhere=_tolerance(value, "tolerance"))


def _tolerance(value: Any, key: str) -> Tolerance:
    if isinstance(value, dict):
        unknown = set(value) - {"rel", "abs"}
        if unknown or not value:
            raise InputError(
                "a tolerance is a number (relative) or {rel: x, abs: y}; per dtype, keys are "
                + ", ".join(DTYPE_NAMES), field=key)
        rel = _number(value.get("rel", 0.0), f"{key}.rel")
        absolute = _number(value.get("abs", 0.0), f"{key}.abs")
    else:
        rel, absolute = _number(value, key), 0.0
    if rel < 0 or absolute < 0:
        raise InputError("must not be negative", field=key)
    return Tolerance(rel=rel, abs=absolute)


def _array_field(value: Any, base: Path, key: str, source: str) -> FloatArray:
    """An inline nested list, a path (relative to the scenario file) or {path, key, dtype}."""
    if isinstance(value, str):
        return load_array(base / value, key=None, source=source, field=key)
    if isinstance(value, dict):
        if set(value) - {"path", "key", "dtype"} or not isinstance(value.get("path"), str):
            raise InputError("a file is given as a path, or as {path: FILE, key: NAME, "
                             "dtype: " + "|".join(RAW_DTYPES) + "} (key and dtype optional)",
                             field=key)
        name = value.get("key")
        if name is not None and not isinstance(name, str):
            raise InputError("'key' must be a string", field=key)
        dtype = value.get("dtype")
        if dtype is not None:
            _choice(dtype, RAW_DTYPES, f"{key}.dtype")
        return load_array(base / value["path"], key=name, source=source, field=key,
                          dtype=dtype)
    return inline_array(value, key)


def inline_array(value: Any, key: str) -> FloatArray:
    """A YAML number or nested list as a float64 (or, all-integer, int64) array."""
    def check(item: Any) -> None:
        if isinstance(item, list):
            for sub in item:
                check(sub)
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            raise InputError(f"holds {item!r}, which is not a number", field=key)

    check(value)
    try:
        array = np.array(value)
    except ValueError:
        raise InputError("rows of different lengths (the nested lists must be rectangular)",
                         field=key) from None
    if array.dtype == object:
        raise InputError("rows of different lengths (the nested lists must be rectangular)",
                         field=key)
    return array if array.dtype.kind in "iu" else array.astype(np.float64)


# -- the case and its validation ---------------------------------------------------------------


def make_case(
    *,
    name: str,
    logits: FloatArray,
    labels: FloatArray,
    family: str = "softmax",
    from_logits: bool = True,
    class_weights: Any = None,
    pos_weight: Any = None,
    label_smoothing: Any = 0.0,
    ignore_index: Any = None,
    reduction: str = "mean",
    source: str = "<inline>",
    description: str = "",
) -> Case:
    """Validate inputs and loss options and build a :class:`Case` (scenarios and CLI alike).

    Raises
    ------
    InputError
        Naming the field at fault and, for a bad value, its index.
    """
    logits = _checked_logits(logits, family, from_logits)
    classes = logits.shape[-1] if logits.ndim > 1 or family == "softmax" else 1
    smoothing = _number(label_smoothing, "label_smoothing")
    if not 0.0 <= smoothing < 1.0:
        raise InputError("must be in [0, 1)", field="label_smoothing")
    if smoothing and family != "softmax":
        raise InputError("applies to the softmax loss only", field="label_smoothing")
    if ignore_index is not None and (isinstance(ignore_index, bool)
                                     or not isinstance(ignore_index, (int, np.integer))):
        raise InputError(f"must be an integer, not {ignore_index!r}", field="ignore_index")
    labels, kind = _checked_labels(np.asarray(labels), logits, family, classes, ignore_index)
    if kind == "dense" and ignore_index is not None:
        raise InputError("applies to integer labels; these are one-hot or probability rows",
                         field="ignore_index")
    weights: FloatArray | None
    if class_weights == "balanced" or (isinstance(class_weights, dict)
                                       and set(class_weights) == {"balanced"}):
        if family != "softmax":
            raise InputError("balanced weights apply to the softmax loss", field="class_weights")
        options = class_weights["balanced"] if isinstance(class_weights, dict) else {}
        weights = _balanced(labels, kind, classes, ignore_index, options)
    else:
        weights = _weights(class_weights, classes, "class_weights", allow_scalar=False)
    if weights is not None and not weights.any():
        raise InputError("are all zero", field="class_weights")
    if pos_weight is not None and family != "sigmoid":
        raise InputError("applies to the sigmoid loss only", field="pos_weight")
    positive = _weights(pos_weight, classes, "pos_weight", allow_scalar=True)
    spec = LossSpec(
        family=family,  # type: ignore[arg-type]
        from_logits=from_logits,
        class_weights=weights,
        pos_weight=positive,
        label_smoothing=smoothing,
        ignore_index=None if ignore_index is None else int(ignore_index),
        reduction=reduction,  # type: ignore[arg-type]
    )
    case = Case(name=name, logits=logits, labels=labels, label_kind=kind, spec=spec,
                source=source, description=description)
    if (reduction == "mean" and kind == "index" and ignore_index is not None
            and not np.any(np.asarray(labels) != ignore_index)):
        raise InputError("every label equals ignore_index: the mean is undefined",
                         field="labels")
    return case


def _first_index(mask: FloatArray) -> list[int]:
    return [int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape)]


# Rows per validation step: a few million values, whatever the file's size.
_CHECK_VALUES = 1 << 22


def _find_first(
    array: FloatArray, predicate: Callable[[FloatArray], FloatArray],
    possible: Callable[[FloatArray], bool] | None = None, *, whole_rows: bool = False,
) -> list[int] | None:
    """Index (in ``array``'s shape) of the first value where ``predicate`` holds, scanning
    row blocks (a row wider than a block in pieces, unless ``whole_rows``: the predicate
    reduces rows) so that a memory-mapped file is never read into memory whole. ``possible``
    screens a block cheaply in its own dtype: where it says no, the predicate is not run."""
    width = array.shape[-1] if array.ndim else 1
    rows = array.reshape(-1, width)
    step = max(1, _CHECK_VALUES // max(1, width))
    # a row wider than a step is scanned in pieces, unless the predicate needs whole rows
    columns = width if whole_rows else min(width, _CHECK_VALUES)
    for start in range(0, rows.shape[0], step):
        for first in range(0, width, columns):
            chunk = rows[start:start + step, first:first + columns]
            if possible is not None and not possible(chunk):
                release_pages(array, chunk)
                continue
            with np.errstate(invalid="ignore"):
                hit = np.asarray(predicate(np.asarray(chunk, dtype=np.float64)))
            release_pages(array, chunk)
            if hit.any():
                r, c = np.unravel_index(int(np.argmax(hit)), hit.shape)
                flat = (start + int(r)) * width + first + int(c)
                return ([int(i) for i in np.unravel_index(flat, array.shape)]
                        if array.ndim else [])
    return None


def _may_hold_nonfinite(chunk: FloatArray) -> bool:
    """False only if every value is finite: a NaN makes the maximum NaN, an infinity the
    maximum or minimum infinite. Two reductions, exact in the chunk's own dtype (narrow
    formats through small float32 slices, :mod:`xentcheck.extrema`); no float64 copy."""
    with np.errstate(invalid="ignore"):  # ml_dtypes' bfloat16 reduction warns on NaN
        return not (np.isfinite(extrema.maximum(chunk)) and np.isfinite(extrema.minimum(chunk)))


def _may_hold_nan_or_inf(chunk: FloatArray) -> bool:
    """False only if the chunk holds neither NaN nor +inf (-inf, a masked logit, may be
    there): a NaN makes the maximum NaN, a +inf makes it +inf. One reduction, no float64
    copy."""
    with np.errstate(invalid="ignore"):  # ml_dtypes' bfloat16 reduction warns on NaN
        return not bool(extrema.maximum(chunk) < np.inf)


def _value_at(array: FloatArray, index: list[int]) -> float:
    return float(np.asarray(array[tuple(index)], dtype=np.float64))


def _checked_logits(logits: FloatArray, family: str, from_logits: bool) -> FloatArray:
    key = "logits"
    array = logits if isinstance(logits, np.memmap) else np.asarray(logits)
    if array.dtype.kind in "iu" and not isinstance(logits, np.memmap):
        array = array.astype(np.float64)  # inline integer lists
    if array.dtype.kind not in "f" and array.dtype.name != "bfloat16":
        raise InputError(f"must be floating point, not {array.dtype}", field=key)
    if array.ndim == 0 or array.size == 0:
        raise InputError("must be a non-empty array (a list of logits per example)", field=key)
    if from_logits:
        # -inf is a masked entry (a padded vocabulary, constrained decoding): exp gives 0, as
        # in the frameworks. +inf and NaN have no such meaning.
        where = _find_first(array, lambda v: np.isnan(v) | (v == np.inf), _may_hold_nan_or_inf)
        allowed = "; inputs must be finite (or -inf, a masked entry)"
    else:
        where = _find_first(array, lambda v: ~np.isfinite(v), _may_hold_nonfinite)
        allowed = "; inputs must be finite"
    if where is not None:
        raise InputError(f"holds {_value_at(array, where)} at index {where}{allowed}", field=key)
    if not from_logits:
        where = _find_first(array, lambda v: (v < 0) | (v > 1))
        if where is not None:
            raise InputError(tagged(
                "XC102", f"from_logits is false, so these are probabilities, but index {where} "
                f"holds {_value_at(array, where)} (outside [0, 1])"), field=key)
        if family == "softmax":
            row = _find_first(array, lambda v: (v.sum(axis=-1) <= 0)[:, None],
                              whole_rows=True)
            if row is not None:
                raise InputError(f"the probabilities of row {row[:-1] or [0]} sum to 0",
                                 field=key)
    return array


def _checked_labels(
    labels: FloatArray, logits: FloatArray, family: str, classes: int, ignore_index: Any
) -> tuple[FloatArray, LabelKind]:
    key = "labels"
    if labels.size == 0:
        raise InputError("must not be empty", field=key)
    if labels.dtype.kind not in "iuf" and labels.dtype.name != "bfloat16":
        raise InputError(f"must be numbers, not {labels.dtype}", field=key)
    where = _find_first(labels, lambda v: ~np.isfinite(v), _may_hold_nonfinite)
    if where is not None:
        raise InputError(f"holds {_value_at(labels, where)} at index {where}", field=key)

    def counted(v: FloatArray) -> FloatArray:
        return v if ignore_index is None else np.where(v == ignore_index, 0.0, v)

    if family == "sigmoid":
        if labels.shape != logits.shape:
            raise InputError(f"have shape {list(labels.shape)}; sigmoid targets need the logits' "
                             f"shape {list(logits.shape)}", field=key)
        where = _find_first(labels, lambda v: (counted(v) < 0) | (counted(v) > 1))
        if where is not None:
            raise InputError(f"target {_value_at(labels, where)} at index {where} is outside "
                             "[0, 1]", field=key)
        return labels, "binary"
    if labels.shape == logits.shape[:-1]:
        values = np.asarray(labels, dtype=np.float64)  # one id per example: small
        fractional = values != np.round(values)
        if fractional.any():
            where = _first_index(fractional)
            raise InputError(f"integer class ids expected; index {where} holds "
                             f"{values[tuple(where)]}", field=key)
        ids = values.astype(np.int64)
        out_of_range = ((ids < 0) | (ids >= classes))
        if ignore_index is not None:
            out_of_range &= ids != ignore_index
        if out_of_range.any():
            where = _first_index(out_of_range)
            hint = "" if ignore_index is not None else " (padding? set ignore_index)"
            raise InputError(tagged("XC201", f"label {ids[tuple(where)]} at index {where} is "
                                    f"outside [0, {classes}){hint}"), field=key)
        return ids, "index"
    if labels.shape == logits.shape:
        where = _find_first(labels, lambda v: v < 0)
        if where is not None:
            raise InputError(tagged("XC202", f"probability {_value_at(labels, where)} at "
                                    f"index {where} is negative"), field=key)
        eps = float(np.finfo(np.float64).eps) if labels.dtype.itemsize >= 8 else (
            float(np.finfo(np.float32).eps) if labels.dtype.itemsize == 4 else 2.0**-7)
        limit = max(1e-6, classes * eps)
        row = _find_first(labels, lambda v: (np.abs(v.sum(axis=-1) - 1.0) > limit)[:, None],
                          whole_rows=True)
        if row is not None:
            total = float(np.asarray(labels[tuple(row[:-1])], dtype=np.float64).sum())
            raise InputError(tagged("XC202", f"one-hot or probability rows must sum to 1; row "
                                    f"{row[:-1]} sums to {total:.6g}"), field=key)
        return labels, "dense"
    raise InputError(
        f"have shape {list(labels.shape)}; expected {list(logits.shape[:-1])} (integer class "
        f"ids) or {list(logits.shape)} (one-hot or probability rows)", field=key)


# mu of the inverse-frequency log recipe: w_c = max(1, ln(mu * N / n_c)).
BALANCED_MU = 0.15


def _balanced(labels: FloatArray, kind: str, classes: int, ignore_index: Any,
              options: Any) -> FloatArray:
    """``class_weights: balanced``: ``w_c = max(1, ln(mu N / n_c))`` from the label counts.

    The inverse-frequency log recipe: rare classes weigh more, logarithmically, and no
    class weighs less than 1. ``{balanced: {mu: 0.15, normalize: true}}`` sets mu and
    divides by the largest weight. A class that never occurs gets the largest weight.
    """
    if not isinstance(options, dict) or set(options) - {"mu", "normalize"}:
        raise InputError("balanced takes {mu: number, normalize: true|false}",
                         field="class_weights")
    mu = _number(options.get("mu", BALANCED_MU), "class_weights.mu")
    if mu <= 0:
        raise InputError("mu must be positive", field="class_weights")
    normalize = _boolean(options.get("normalize", False), "class_weights.normalize")
    if kind == "index":
        ids = np.asarray(labels)
        counted = ids[ids != ignore_index] if ignore_index is not None else ids
        counts = np.bincount(counted.ravel(), minlength=classes).astype(np.float64)
    else:
        counts = np.asarray(labels, dtype=np.float64).reshape(-1, classes).sum(axis=0)
    total = counts.sum()
    with np.errstate(divide="ignore"):
        weights = np.maximum(1.0, np.log(mu * total / counts))
    seen = counts > 0
    weights[~seen] = weights[seen].max() if seen.any() else 1.0
    return weights / weights.max() if normalize else weights


def _weights(value: Any, classes: int, key: str, *, allow_scalar: bool) -> FloatArray | None:
    if value is None:
        return None
    if allow_scalar and not isinstance(value, list):
        return np.array(_number(value, key))
    array = inline_array(value, key).astype(np.float64)
    if array.shape != (classes,):
        raise InputError(f"need one number per class ({classes}), got shape {list(array.shape)}",
                         field=key)
    if (array < 0).any():
        raise InputError(f"must not be negative (index {int(np.argmax(array < 0))})", field=key)
    return array
