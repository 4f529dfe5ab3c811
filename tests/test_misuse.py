"""Misuse rules: each with an input that triggers it and one that does not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from xentcheck.case_validation import make_case
from xentcheck.cli import cli
from xentcheck.errors import InputError
from xentcheck.evaluator import evaluate
from xentcheck.misuse import RULES
from xentcheck.pipelines import textbook
from xentcheck.precision import precisions_for

Write = Callable[[str, str], Path]


def warnings_for(logits: object, labels: object, **options: object) -> list[str]:
    case = make_case(name="m", logits=np.asarray(logits, dtype=np.float64),
                     labels=np.asarray(labels), **options)  # type: ignore[arg-type]
    result = evaluate(case, precisions_for(["float64"]),
                      textbook(case.spec.family, case.spec.from_logits))
    return [w.rule for w in result.warnings]


def test_probabilities_as_logits() -> None:
    assert warnings_for([[0.1, 0.9], [0.5, 0.5]], [1, 0]) == ["XC101"]
    assert warnings_for([[0.1, 0.8], [0.5, 0.5]], [1, 0]) == []  # a row sums to 0.9
    assert warnings_for([[1.0, 2.0]], [1]) == []


def test_logits_as_probabilities_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"\[XC102 logits-as-probabilities"):
        warnings_for([[2.0, -1.0]], [0], from_logits=False)
    assert warnings_for([[0.25, 0.75]], [0], from_logits=False) == []


def test_unnormalised_probabilities() -> None:
    assert warnings_for([[0.2, 0.3, 0.4]], [2], from_logits=False) == ["XC103"]
    assert warnings_for([[0.2, 0.3, 0.5]], [2], from_logits=False) == []


def test_label_out_of_range_names_padding() -> None:
    # A padded language-model batch whose padding label equals the vocabulary size
    with pytest.raises(InputError, match=r"label 5 at index \[1\] is outside \[0, 5\) "
                                         r"\(padding\? set ignore_index\) \[XC201"):
        warnings_for(np.zeros((2, 5)), [3, 5])
    assert warnings_for(np.zeros((2, 5)), [3, 5], ignore_index=5) == []


def test_labels_not_distributions() -> None:
    with pytest.raises(InputError, match=r"sums to 0.8 \[XC202"):
        warnings_for([[1.0, 2.0]], [[0.4, 0.4]])
    with pytest.raises(InputError, match=r"is negative \[XC202"):
        warnings_for([[1.0, 2.0]], [[1.5, -0.5]])
    assert warnings_for([[1.0, 2.0]], [[0.4, 0.6]]) == []


def test_single_class_softmax() -> None:
    assert warnings_for([[3.0], [1.0]], [0, 0]) == ["XC301"]
    assert warnings_for([[3.0, 1.0]], [0]) == []


def test_sigmoid_on_softmax_outputs() -> None:
    assert warnings_for([[0.2, 0.8], [0.6, 0.4]], [[0, 1], [1, 0]], family="sigmoid",
                        from_logits=False) == ["XC302"]
    assert warnings_for([[0.2, 0.9]], [[0, 1]], family="sigmoid", from_logits=False) == []


def test_one_hot_large_vocabulary_says_how_much() -> None:
    classes = 2048
    labels = np.zeros((4, classes))
    labels[np.arange(4), [1, 2, 3, 4]] = 1.0
    case = make_case(name="m", logits=np.zeros((4, classes)), labels=labels)
    result = evaluate(case, precisions_for(["float64"]), textbook("softmax", True)[2:])
    (warning,) = result.warnings
    assert warning.rule == "XC401"
    # 4 x 2048 float64 labels = 64 KiB against 4 int64 ids = 32 bytes
    assert "take 64.0 KiB; integer ids would take 32 bytes" in warning.message
    assert warnings_for(np.zeros((4, 8)), np.eye(8)[:4]) == []


def test_warnings_in_table_and_json(write: Write) -> None:
    path = write("s.yaml", "logits: [[0.1, 0.9]]\nlabels: [1]\n")
    runner = CliRunner()
    table = runner.invoke(cli, ["run", str(path), "--dtype", "float32"], env={"NO_COLOR": "1"})
    assert "warning XC101 probabilities-as-logits" in table.stdout
    doc = runner.invoke(cli, ["run", str(path), "--format", "json"]).stdout
    assert '"rule": "XC101"' in doc


def test_explain_lists_and_explains_every_rule() -> None:
    runner = CliRunner()
    listing = runner.invoke(cli, ["explain"]).stdout
    assert all(rule in listing for rule in RULES)
    for rule in RULES.values():
        text = runner.invoke(cli, ["explain", rule.id]).stdout
        assert text.startswith(f"{rule.id} {rule.name}") and rule.explanation in text
        assert runner.invoke(cli, ["explain", rule.name]).stdout == text
    bad = runner.invoke(cli, ["explain", "XC999"])
    assert bad.exit_code == 2 and "no rule 'XC999'" in bad.stderr


def test_balanced_class_weights_follow_the_log_recipe(write: Write) -> None:
    # counts [6, 3, 1, 0] of N = 10 counted labels (two -100 pads ignored): with the
    # default mu = 0.15, ln(0.15 * 10 / n_c) is at most ln 1.5 < 1, so every weight clips to 1
    labels = "[0, 0, 0, 0, 0, 0, 1, 1, 1, 2, -100, -100]"
    path = write("s.yaml", f"logits: {np.zeros((12, 4)).tolist()}\nlabels: {labels}\n"
                           "ignore_index: -100\nclass_weights: balanced\n")
    from xentcheck.scenario import load_scenarios

    (scenario,) = load_scenarios(path)
    weights = scenario.case.spec.class_weights
    assert weights is not None
    np.testing.assert_array_equal(weights, [1.0, 1.0, 1.0, 1.0])
    path = write("t.yaml", f"logits: {np.zeros((12, 4)).tolist()}\nlabels: {labels}\n"
                           "ignore_index: -100\nclass_weights: {balanced: {mu: 3, "
                           "normalize: true}}\n")
    (scenario,) = load_scenarios(path)
    raw = np.maximum(1.0, np.log(3 * 10 / np.array([6.0, 3.0, 1.0])))
    expected = np.append(raw, raw.max()) / raw.max()
    np.testing.assert_allclose(scenario.case.spec.class_weights, expected, rtol=1e-15)
    table = CliRunner().invoke(cli, ["run", str(path), "--dtype", "float64"],
                               env={"NO_COLOR": "1"}).stdout
    shown = ", ".join(f"{w:.4g}" for w in expected)  # ln 5, ln 10, ln 30, ln 30 over ln 30
    assert f"class weights: [{shown}]" in table and shown.startswith("0.4732, 0.677, 1, 1")
    bad = write("b.yaml", "logits: [[1, 2]]\nlabels: [0]\nclass_weights: {balanced: {m: 1}}\n")
    result = CliRunner().invoke(cli, ["run", str(bad)])
    assert result.exit_code == 2 and "balanced takes" in result.stderr
