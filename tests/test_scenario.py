"""Scenario loading and validation: every valid form, and every bad input as one InputError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from xentcheck.errors import InputError
from xentcheck.findings import Tolerance
from xentcheck.scenario import load_scenarios

Write = Callable[[str, str], Path]


def test_inline_scenario_with_defaults(write: Write) -> None:
    path = write("demo.yaml", "logits: [[1, 2, 3], [0, 0, 1]]\nlabels: [2, 0]\n")
    (scenario,) = load_scenarios(path)
    case = scenario.case
    assert case.name == "demo"
    assert case.label_kind == "index"
    assert case.logits.dtype == np.float64
    assert case.labels.tolist() == [2, 0]
    assert case.spec.family == "softmax" and case.spec.reduction == "mean"
    assert scenario.dtypes is None and scenario.pipelines is None
    assert scenario.lines == {"logits": 1, "labels": 2}


def test_scenarios_list_and_line_numbers(write: Write) -> None:
    path = write("many.yaml", (
        "scenarios:\n"
        "  - name: a\n    logits: [0, 1]\n    labels: 1\n"
        "  - logits: [[0.5, 0.5]]\n    labels: [[0.5, 0.5]]\n    loss: softmax\n"
    ))
    first, second = load_scenarios(path)
    assert first.case.name == "a" and first.lines["labels"] == 4
    assert second.case.name == "many[1]" and second.case.label_kind == "dense"


def test_every_key(write: Write) -> None:
    path = write("full.yaml", """
name: full
description: all the keys
loss: softmax
logits: [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]
labels: [0, -100]
from_logits: true
class_weights: [1, 2, 3]
label_smoothing: 0.1
ignore_index: -100
reduction: sum
dtypes: [float16, float32]
pipelines: stable
tolerance: {float16: 0.01, float32: {rel: 1.0e-6, abs: 1.0e-9}}
""")
    (s,) = load_scenarios(path)
    assert s.case.spec.class_weights is not None
    assert s.case.spec.class_weights.tolist() == [1.0, 2.0, 3.0]
    assert s.case.spec.label_smoothing == 0.1 and s.case.spec.ignore_index == -100
    assert s.dtypes == ("float16", "float32") and s.pipelines == ("stable",)
    assert s.tolerance is not None
    default = Tolerance(rel=0.5)
    assert s.tolerance.for_dtype("float16", default) == Tolerance(rel=0.01)
    assert s.tolerance.for_dtype("float32", default) == Tolerance(rel=1e-6, abs=1e-9)
    assert s.tolerance.for_dtype("float64", default) == default


def test_sigmoid_with_pos_weight(write: Write) -> None:
    path = write("b.yaml", "loss: sigmoid\nlogits: [[1, -2], [3, 4]]\nlabels: [[0, 1], [1, 0.5]]\n"
                           "pos_weight: [2, 3]\n")
    (s,) = load_scenarios(path)
    assert s.case.label_kind == "binary" and s.case.classes == 2
    assert s.case.spec.pos_weight is not None and s.case.spec.pos_weight.tolist() == [2.0, 3.0]


def test_files_relative_to_the_scenario(tmp_path: Path, write: Write) -> None:
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "x.npy", np.array([[1.0, 2.0]], dtype=np.float16))
    np.savez(data / "y.npz", labels=np.array([1]), other=np.array([0]))
    path = write("s.yaml", "logits: data/x.npy\nlabels: {path: data/y.npz, key: labels}\n")
    (s,) = load_scenarios(path)
    assert s.case.logits.dtype == np.float16  # the file's own dtype is kept
    assert s.case.labels.tolist() == [1]


def test_bfloat16_safetensors(tmp_path: Path, write: Write) -> None:
    from safetensors.numpy import save_file

    save_file({"logits": np.array([[2500.0, 1.0]], dtype=ml_dtypes.bfloat16)},
              str(tmp_path / "t.safetensors"))
    path = write("s.yaml", "logits: {path: t.safetensors, key: logits}\nlabels: [0]\n")
    (s,) = load_scenarios(path)
    assert s.case.logits.dtype == np.dtype(ml_dtypes.bfloat16)
    assert float(s.case.logits[0, 0]) == 2496.0  # bfloat16 holds 2500 as 2496


BAD = [
    ("logits: [1, 2]\nlabels: 1\nlables: 2\n", "lables", "did you mean 'labels'"),
    ("logits: [1, 2]\nlabels: 1\nexpect: {}\n", "expect", "non-empty list"),
    ("logits: [1, 2]\nlabels: 1\nexpect:\n  - {los: nan}\n", "expect[0] (line 4)",
     "did you mean 'loss'"),
    ("logits: [1, 2]\nlabels: 1\nexpect:\n  - {loss: broken}\n", "expect[0]", "finite, nan"),
    ("logits: [1, 2]\nlabels: 1\nexpect:\n  - {flags: [oops]}\n", "expect[0]", "not one of"),
    ("logits: [1, 2]\nlabels: 1\nexpect:\n  - {max_ulp_error: many}\n", "expect[0]", "number"),
    ("logits: [1, 2]\nlabels: 1\nexpect:\n  - {dtype: float8, loss: nan}\n", "expect[0]",
     "not one of"),
    ("logits: [1, 2]\nlabels: 1\nexpect:\n  - {no_mismatch: [stable]}\n", "expect[0]",
     "two pipelines"),
    ("logits: [1, 2]\nlabels: 1\nexpect:\n  - {pipeline: stable}\n", "expect[0]",
     "no condition"),
    ("labels: 1\n", "logits", "is required"),
    ("logits: [1, 2]\n", "labels", "is required"),
    ("logits: [[1, 2], [3]]\nlabels: [0, 0]\n", "logits", "rectangular"),
    ("logits: [1, .nan]\nlabels: 0\n", "logits", "index [1]"),
    ("logits: [1, .inf]\nlabels: 0\n", "logits", "finite"),
    ("logits: []\nlabels: []\n", "logits", "non-empty"),
    ("logits: [1, 'a']\nlabels: 0\n", "logits", "not a number"),
    ("logits: [[1, 2]]\nlabels: [2]\n", "labels", "outside [0, 2)"),
    ("logits: [[1, 2]]\nlabels: [-100]\n", "labels", "ignore_index"),
    ("logits: [[1, 2]]\nlabels: [0.5]\n", "labels", "integer class ids"),
    ("logits: [[1, 2]]\nlabels: [[0.5, 0.6]]\n", "labels", "sum to 1"),
    ("logits: [[1, 2]]\nlabels: [[1.5, -0.5]]\n", "labels", "negative"),
    ("logits: [[1, 2]]\nlabels: [0, 1, 1]\n", "labels", "expected [1]"),
    ("loss: sigmoid\nlogits: [1, 2]\nlabels: [0, 2]\n", "labels", "outside [0, 1]"),
    ("loss: sigmoid\nlogits: [1, 2]\nlabels: [0]\n", "labels", "shape"),
    ("loss: hinge\nlogits: [1, 2]\nlabels: 0\n", "loss", "not one of"),
    ("from_logits: false\nlogits: [0.5, 1.5]\nlabels: 0\n", "logits", "outside [0, 1]"),
    ("from_logits: false\nlogits: [[0, 0]]\nlabels: [0]\n", "logits", "sum to 0"),
    ("from_logits: yes please\nlogits: [1, 2]\nlabels: 0\n", "from_logits", "true or false"),
    ("logits: [1, 2]\nlabels: 0\nclass_weights: [1]\n", "class_weights", "one number per class"),
    ("logits: [1, 2]\nlabels: 0\nclass_weights: [1, -1]\n", "class_weights", "negative"),
    ("logits: [1, 2]\nlabels: 0\nclass_weights: [0, 0]\n", "class_weights", "all zero"),
    ("logits: [1, 2]\nlabels: 0\npos_weight: 2\n", "pos_weight", "sigmoid"),
    ("logits: [1, 2]\nlabels: 0\nlabel_smoothing: 1.5\n", "label_smoothing", "[0, 1)"),
    ("logits: [1, 2]\nlabels: 0\nlabel_smoothing: yes\n", "label_smoothing", "number"),
    ("logits: [1, 2]\nlabels: 0\nignore_index: 1.5\n", "ignore_index", "integer"),
    ("logits: [[1, 2]]\nlabels: [[1, 0]]\nignore_index: -100\n", "ignore_index", "integer labels"),
    ("logits: [[1, 2]]\nlabels: [-1]\nignore_index: -1\n", "labels", "mean is undefined"),
    ("logits: [1, 2]\nlabels: 0\nreduction: avg\n", "reduction", "not one of"),
    ("logits: [1, 2]\nlabels: 0\ndtypes: [float8]\n", "dtypes", "not one of"),
    ("logits: [1, 2]\nlabels: 0\npipelines: [clipped]\n", "pipelines", "unknown pipeline"),
    ("logits: [1, 2]\nlabels: 0\ntolerance: {rel: -1}\n", "tolerance", "negative"),
    ("logits: [1, 2]\nlabels: 0\ntolerance: {rtol: 1}\n", "tolerance", "rel"),
    # every form of tolerance: finite and non-negative
    ("logits: [1, 2]\nlabels: 0\ntolerance: .nan\n", "tolerance", "finite"),
    ("logits: [1, 2]\nlabels: 0\ntolerance: .inf\n", "tolerance", "finite"),
    ("logits: [1, 2]\nlabels: 0\ntolerance: -1.0e-3\n", "tolerance", "negative"),
    ("logits: [1, 2]\nlabels: 0\ntolerance: {abs: .inf}\n", "tolerance.abs", "finite"),
    ("logits: [1, 2]\nlabels: 0\ntolerance: {float16: .nan}\n", "tolerance.float16",
     "finite"),
    ("logits: [1, 2]\nlabels: 0\ntolerance: {float32: {rel: -.inf}}\n",
     "tolerance.float32.rel", "finite"),
    ("logits: [1, 2]\nlabels: 0\ntolerance: {float64: {abs: -1}}\n", "tolerance.float64",
     "negative"),
    # expect bounds: finite; an upper bound on an error is non-negative
    ("logits: [1, 2]\nlabels: 1\nexpect:\n  - {max_ulp_error: .inf}\n", "expect[0]",
     "finite number, not inf"),
    ("logits: [1, 2]\nlabels: 1\nexpect:\n  - {max_rel_error: .nan}\n", "expect[0]",
     "finite number, not nan"),
    ("logits: [1, 2]\nlabels: 1\nexpect:\n  - {max_abs_error: -1}\n", "expect[0]",
     "must not be negative"),
    ("logits: [1, 2]\nlabels: 1\nexpect:\n  - {min_largest_safe_logit: -.inf}\n",
     "expect[0]", "finite number, not -inf"),
    ("logits: missing.npy\nlabels: 0\n", "logits", "no such file"),
    ("logits: {path: x.npz}\nlabels: 0\n", "logits", "no such file"),
    ("- 1\n- 2\n", None, "mapping"),
    ("logits: [1, 2\nlabels: 0\n", None, "not valid YAML"),
    ("scenarios: []\n", "scenarios", "non-empty"),
    ("scenarios: [{logits: [1, 2], labels: 0}]\nname: x\n", "name", "nothing else"),
]


@pytest.mark.parametrize(("text", "field", "message"), BAD)
def test_bad_scenarios_are_one_input_error(
    write: Write, text: str, field: str | None, message: str
) -> None:
    path = write("bad.yaml", text)
    with pytest.raises(InputError) as caught:
        load_scenarios(path)
    error = caught.value
    assert error.source == str(path)
    if field is not None:
        assert error.field is not None and error.field.startswith(field)
    assert message in str(error)
    assert "\n" not in str(error)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_scenarios(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="directory"):
        load_scenarios(tmp_path)


@pytest.mark.parametrize(("text", "key", "line", "first"), [
    ("logits: [1, 2]\nlabels: 0\nlabels: 1\n", "labels", 3, 2),
    ("logits: [1, 2]\nlabels: 0\ntolerance: {rel: 0.1, rel: 0.2}\n", "rel", 3, 3),
    ("logits: [1, 2]\nlabels: 0\nexpect:\n  - pipeline: naive\n    loss: nan\n"
     "    loss: finite\n", "loss", 6, 5),
    ("scenarios:\n  - logits: [1, 2]\n    labels: 0\n    name: a\n    name: b\n", "name", 5, 4),
    ("scenarios:\n  - {logits: [1, 2], labels: 0}\nscenarios: []\n", "scenarios", 3, 1),
    ("logits: {path: x.npz, key: a, key: b}\nlabels: 0\n", "key", 1, 1),
])
def test_a_duplicate_key_at_any_level_is_an_error(
    write: Write, text: str, key: str, line: int, first: int
) -> None:
    # PyYAML keeps the last of two equal keys: the first would be silently replaced.
    path = write("dup.yaml", text)
    with pytest.raises(InputError) as caught:
        load_scenarios(path)
    assert caught.value.source == str(path)
    assert caught.value.field == f"{key} (line {line})"
    assert f"duplicate key (first given on line {first})" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_merge_key_may_still_be_overridden(write: Write) -> None:
    path = write("merge.yaml", "scenarios:\n  - &a {name: a, logits: [1, 2], labels: 0}\n"
                 "  - <<: *a\n    name: b\n")
    first, second = load_scenarios(path)
    assert (first.case.name, second.case.name) == ("a", "b")
    assert second.case.labels.tolist() == 0


def test_only_safe_yaml_types_are_constructed(write: Write) -> None:
    path = write("unsafe.yaml", "logits: !!python/object/apply:os.getcwd []\nlabels: 0\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_scenarios(path)


def test_a_lower_bound_on_a_limit_may_be_negative(write: Write) -> None:
    # edges can be negative (float16 naive with C > 65504): min_largest_safe_logit: -5 is valid
    path = write("s.yaml", "logits: [1, 2]\nlabels: 1\nexpect:\n"
                           "  - {min_largest_safe_logit: -5, max_ulp_error: 0}\n")
    (scenario,) = load_scenarios(path)
    assert scenario.expectations[0].conditions == {"min_largest_safe_logit": -5.0,
                                                    "max_ulp_error": 0.0}


def test_raw_bfloat16_npy_with_a_dtype_key(tmp_path: Path, write: Write) -> None:
    values = np.array([[2500.0, 1.0]], dtype=ml_dtypes.bfloat16)
    np.save(tmp_path / "x.npy", values)  # stored as |V2
    path = write("s.yaml", "logits: {path: x.npy, dtype: bfloat16}\nlabels: [0]\n")
    (s,) = load_scenarios(path)
    assert s.case.logits.dtype == np.dtype(ml_dtypes.bfloat16)
    assert s.case.logits.tobytes() == values.tobytes()
    bad = write("b.yaml", "logits: {path: x.npy, dtype: float32}\nlabels: [0]\n")
    with pytest.raises(InputError, match="'float32' is not one of bfloat16, float16") as caught:
        load_scenarios(bad)
    assert caught.value.field == "logits.dtype"
    plain = write("p.yaml", "logits: x.npy\nlabels: [0]\n")
    with pytest.raises(InputError, match=r"say so with \{path: x.npy, dtype: bfloat16\}"):
        load_scenarios(plain)
