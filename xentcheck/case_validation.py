"""A validated :class:`~xentcheck.case.Case` from arrays and loss options, for scenario
files and the command line alike: the logits and labels are scanned block by block (a
memory-mapped file is never read whole) and the first bad value is named with its index;
class weights (given, or ``balanced`` from the label counts) and the loss options are
checked against the loss family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import extrema, fields
from .arrays import is_float, release_pages
from .case import DEFAULT_CHUNK_SIZE, Case, LabelKind, LossSpec
from .errors import InputError
from .misuse import tagged
from .precision import FloatArray


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
    chunk_size: Any = DEFAULT_CHUNK_SIZE,
    source: str = "<inline>",
    description: str = "",
    z_loss: Any = 0.0,
    logit_softcap: Any = None,
    temperature: Any = 1.0,
) -> Case:
    """Validate inputs and loss options and build a :class:`Case` (scenarios and CLI alike).

    Raises
    ------
    InputError
        Naming the field at fault and, for a bad value, its index.
    """
    logits = _checked_logits(logits, family, from_logits)
    classes = logits.shape[-1] if logits.ndim > 1 or family == "softmax" else 1
    smoothing = fields.number(label_smoothing, "label_smoothing")
    if not 0.0 <= smoothing < 1.0:
        raise InputError("must be in [0, 1)", field="label_smoothing")
    if smoothing and family != "softmax":
        raise InputError("applies to the softmax loss only", field="label_smoothing")
    if ignore_index is not None and (isinstance(ignore_index, bool)
                                     or not isinstance(ignore_index, (int, np.integer))):
        raise InputError(f"must be an integer, not {ignore_index!r}", field="ignore_index")
    z_coef, cap, scale = loss_options(z_loss, logit_softcap, temperature, family, from_logits)
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
            or chunk_size < 1):
        raise InputError(f"must be a positive integer, not {chunk_size!r}", field="chunk_size")
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
        z_loss=z_coef,
        logit_softcap=cap,
        temperature=scale,
        chunk_size=int(chunk_size),
    )
    case = Case(name=name, logits=logits, labels=labels, label_kind=kind, spec=spec,
                source=source, description=description)
    if (reduction == "mean" and kind == "index" and ignore_index is not None
            and not np.any(np.asarray(labels) != ignore_index)):
        raise InputError("every label equals ignore_index: the mean is undefined",
                         field="labels")
    return case


def loss_options(z_loss: Any, logit_softcap: Any, temperature: Any, family: str,
                  from_logits: bool) -> tuple[float, float | None, float]:
    """The validated loss options: ``z_loss >= 0`` (softmax from logits), ``logit_softcap >
    0`` and ``temperature > 0`` (logits of either family), all finite."""
    coef = fields.number(z_loss, "z_loss")
    if coef < 0:
        raise InputError("must be >= 0", field="z_loss")
    if coef and (family != "softmax" or not from_logits):
        raise InputError("applies to the softmax loss from logits only", field="z_loss")
    cap = None if logit_softcap is None else fields.number(logit_softcap, "logit_softcap")
    if cap is not None and cap <= 0:
        raise InputError("must be > 0", field="logit_softcap")
    scale = fields.number(temperature, "temperature")
    if scale <= 0:
        raise InputError("must be > 0", field="temperature")
    for key, given in (("logit_softcap", cap is not None), ("temperature", scale != 1.0)):
        if given and not from_logits:
            raise InputError("applies to logits, not probabilities", field=key)
    return coef, cap, scale


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
    if not is_float(array.dtype):
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
    if labels.dtype.kind not in "iu" and not is_float(labels.dtype):
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
    mu = fields.number(options.get("mu", BALANCED_MU), "class_weights.mu")
    if mu <= 0:
        raise InputError("mu must be positive", field="class_weights")
    normalize = fields.boolean(options.get("normalize", False), "class_weights.normalize")
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
        return np.array(fields.number(value, key))
    array = fields.inline_array(value, key).astype(np.float64)
    if array.shape != (classes,):
        raise InputError(f"need one number per class ({classes}), got shape {list(array.shape)}",
                         field=key)
    if (array < 0).any():
        raise InputError(f"must not be negative (index {int(np.argmax(array < 0))})", field=key)
    return array
