"""Scenario files: YAML in, validated Cases out.

One scenario per file, or a top-level ``scenarios:`` list. Keys are those of
docs/scenarios.md; an unknown key is an error with a suggestion, so a typo is never ignored. Only
``yaml.SafeLoader`` is used. Every problem is an :class:`InputError` naming the file and key.
The case itself is built and checked by :mod:`xentcheck.case_validation`, each key's value
by :mod:`xentcheck.fields`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import fields
from .arrays import RAW_DTYPES, load_array, load_csv_with_labels
from .case import DEFAULT_CHUNK_SIZE, FAMILIES, REDUCTIONS, Case
from .case_validation import make_case
from .errors import InputError, UsageError, XentcheckError
from .expectations import Expectation, parse_expectations
from .findings import Tolerance
from .pipelines import available, select
from .precision import DTYPE_NAMES, FloatArray
from .user_functions.loading import UserFunction, parse_functions

KEYS: tuple[str, ...] = (
    "name", "description", "loss", "logits", "labels", "from_logits", "class_weights",
    "pos_weight", "label_smoothing", "ignore_index", "reduction", "dtypes", "pipelines",
    "functions", "z_loss", "logit_softcap", "temperature", "chunk_size", "tolerance", "expect",
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
    # users' loss functions (``functions:``), run beside the pipelines
    functions: tuple[UserFunction, ...] = ()


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
            name=fields.string(data.get("name", default_name), "name"),
            description=fields.string(data.get("description", ""), "description"),
            logits=logits,
            labels=labels,
            family=fields.choice(data.get("loss", "softmax"), FAMILIES, "loss"),
            from_logits=fields.boolean(data.get("from_logits", True), "from_logits"),
            class_weights=data.get("class_weights"),
            pos_weight=data.get("pos_weight"),
            label_smoothing=data.get("label_smoothing", 0.0),
            ignore_index=data.get("ignore_index"),
            reduction=fields.choice(data.get("reduction", "mean"), REDUCTIONS, "reduction"),
            chunk_size=data.get("chunk_size", DEFAULT_CHUNK_SIZE),
            source=source,
            z_loss=data.get("z_loss", 0.0),
            logit_softcap=data.get("logit_softcap"),
            temperature=data.get("temperature", 1.0),
        )
        dtypes = fields.names(data.get("dtypes"), "dtypes")
        for name in dtypes or ():
            fields.choice(name, DTYPE_NAMES, "dtypes")
        pipelines = fields.names(data.get("pipelines"), "pipelines")
        if pipelines:
            try:
                select(case.spec.family, case.spec.from_logits, list(pipelines))
            except UsageError as exc:
                raise InputError(str(exc), field="pipelines") from None
        tolerance = parse_tolerance(data.get("tolerance"))
        functions = parse_functions(data.get("functions"), base)
        expectations: tuple[Expectation, ...] = ()
        if "expect" in data:
            names = [p.name for p in available(case.spec.family, case.spec.from_logits,
                                                   every=True)]
            names += [f.spec for f in functions]
            expectations = parse_expectations(data["expect"], _item_lines(node, "expect"), names)
    except InputError as exc:
        raise exc.located(source) from None
    return Scenario(case, dtypes, pipelines, tolerance, source, lines, expectations, functions)


def _item_lines(node: yaml.MappingNode, key: str) -> list[int | None]:
    """1-based line of each item of a sequence value (for messages and CI annotations)."""
    value = _value_node(node, key)
    if not isinstance(value, yaml.SequenceNode):
        return []
    return [item.start_mark.line + 1 for item in value.value]


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
        rel = fields.number(value.get("rel", 0.0), f"{key}.rel")
        absolute = fields.number(value.get("abs", 0.0), f"{key}.abs")
    else:
        rel, absolute = fields.number(value, key), 0.0
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
            fields.choice(dtype, RAW_DTYPES, f"{key}.dtype")
        return load_array(base / value["path"], key=name, source=source, field=key,
                          dtype=dtype)
    return fields.inline_array(value, key)
