"""Users' loss functions: loading a SPEC, settling the framework, and the numpy adapter that
calls and watches them (events against where the user's file really overflows)."""

from __future__ import annotations

import importlib.util
import math
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import mpmath
import numpy as np
import pytest

from xentcheck.errors import InputError, UsageError
from xentcheck.user_functions import adapter_for
from xentcheck.user_functions.loading import UserFunction, load_function, split_spec
from xentcheck.user_functions.numpy_adapter import NumpyAdapter

Write = Callable[[str, str], Path]
EXAMPLES = Path(__file__).parent.parent / "examples"


def line_of(path: Path, text: str) -> int:
    """The 1-based line of ``path`` holding ``text`` (exactly one)."""
    lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    assert len(lines) == 1, lines
    return lines[0]


def module_file(write: Write, name: str, source: str) -> Path:
    return write(name, textwrap.dedent(source))


def call(function: UserFunction, logits: Any, labels: Any,
         upstream: float | None = None) -> Any:
    return NumpyAdapter().call(function.function, logits, labels, user_file=function.file,
                               upstream=upstream)


# -- loading -----------------------------------------------------------------------------------


def test_a_file_spec_is_relative_to_the_base_and_keeps_the_path_as_written(
        write: Write, tmp_path: Path) -> None:
    path = module_file(write, "losses/mine.py", """
        import numpy as np
        def loss(logits, labels):
            return np.zeros(logits.shape[:-1], logits.dtype)
    """)
    loaded = load_function("losses/mine.py:loss", base=tmp_path)
    assert loaded.spec == "losses/mine.py:loss"
    assert loaded.shown == "losses/mine.py"
    assert loaded.file == path.resolve()
    assert loaded.framework == "numpy"
    # the same file named again is not imported again: the same function object
    assert load_function(f"{path}:loss").function is loaded.function


def test_a_module_spec_imports_that_module(write: Write, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    module_file(write, "h5pkg/__init__.py", "")
    module_file(write, "h5pkg/losses.py", """
        def loss(logits, labels):
            return logits.sum(axis=-1)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    loaded = load_function("h5pkg.losses:loss")
    assert loaded.file == (tmp_path / "h5pkg" / "losses.py").resolve()
    assert loaded.shown == str(Path("h5pkg") / "losses.py")
    sys.modules.pop("h5pkg.losses", None)
    sys.modules.pop("h5pkg", None)


@pytest.mark.parametrize(("spec", "message"), [
    ("nowhere.py:loss", "nowhere.py:loss: nowhere.py: no such file"),
    ("no_such_package_h5.losses:loss", "no module named 'no_such_package_h5'"),
])
def test_missing_files_and_modules(spec: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=message):
        load_function(spec, base=tmp_path)


def test_a_spec_without_a_name_is_a_usage_error() -> None:
    for spec in ("losses.py", "losses.py:", ":loss"):
        with pytest.raises(UsageError, match=r"expected FILE\.py:NAME or package\.module:NAME"):
            split_spec(spec)


def test_a_missing_name_suggests_the_nearest(write: Write, tmp_path: Path) -> None:
    module_file(write, "near.py", "def my_loss(logits, labels):\n    return logits\n")
    with pytest.raises(InputError) as raised:
        load_function("near.py:my_los", base=tmp_path)
    assert str(raised.value) == "near.py:my_los: near.py has no 'my_los'; did you mean 'my_loss'?"


def test_a_name_that_is_not_a_function(write: Write, tmp_path: Path) -> None:
    module_file(write, "value.py", "loss = 3\n")
    with pytest.raises(InputError,
                       match=r"'loss' in value\.py is not a function \(a value of type int\)"):
        load_function("value.py:loss", base=tmp_path)


def test_an_import_that_raises_names_the_users_line(write: Write, tmp_path: Path) -> None:
    path = module_file(write, "broken.py", """
        import numpy as np

        SCALE = 1 / 0

        def loss(logits, labels):
            return logits
    """)
    with pytest.raises(InputError) as raised:
        load_function("broken.py:loss", base=tmp_path)
    line = line_of(path, "1 / 0")
    assert str(raised.value) == (f"broken.py:loss: importing it raised ZeroDivisionError: "
                                 f"division by zero (broken.py:{line})")
    assert isinstance(raised.value.cause, ZeroDivisionError)  # for --traceback
    # a failed import leaves nothing behind: fixed, it imports
    path.write_text("def loss(logits, labels):\n    return logits\n")
    assert load_function("broken.py:loss", base=tmp_path).function is not None


def test_a_syntax_error_names_its_line(write: Write, tmp_path: Path) -> None:
    module_file(write, "syntax.py", "def loss(logits, labels):\n    return (logits\n")
    with pytest.raises(InputError, match=r"cannot import it: SyntaxError: .* \(syntax.py:2\)"):
        load_function("syntax.py:loss", base=tmp_path)


@pytest.mark.parametrize(("source", "framework"), [
    ("def loss(x, y):\n    import torch\n    return x\n", "torch"),
    ("def loss(x, y):\n    from jax import numpy as jnp\n    return x\n", "jax"),
    ("def loss(x, y):\n    import jaxtyping\n    import torchvision\n    return x\n", "numpy"),
    ("import numpy as np\ndef loss(x, y):\n    return np.exp(x)\n", "numpy"),
    # a function the module holds, brought in from torch (its __module__ says so)
    ("def _f():\n    pass\n_f.__module__ = 'torch.nn.functional'\ncross_entropy = _f\n"
     "def loss(x, y):\n    return x\n", "torch"),
])
def test_auto_reads_what_the_module_imports(source: str, framework: str, write: Write,
                                            tmp_path: Path) -> None:
    name = f"detect_{abs(hash(source))}.py"
    write(name, source)
    assert load_function(f"{name}:loss", base=tmp_path).framework == framework


def test_both_torch_and_jax_need_framework(write: Write, tmp_path: Path) -> None:
    write("both.py", "def loss(x, y):\n    import torch\n    import jax\n    return x\n")
    with pytest.raises(UsageError, match="imports both torch and jax; say which"):
        load_function("both.py:loss", base=tmp_path)
    assert load_function("both.py:loss", "jax", base=tmp_path).framework == "jax"


def test_the_adapter_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(adapter_for("numpy"), NumpyAdapter)
    with pytest.raises(UsageError, match="unknown framework 'tensorflow'"):
        adapter_for("tensorflow")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(UsageError) as raised:
        adapter_for("torch")
    assert str(raised.value) == ("torch is not installed; a torch loss function needs it: "
                                 "pip install 'xentcheck[torch]'")


# -- the numpy adapter --------------------------------------------------------------------------


def textbook() -> UserFunction:
    return load_function(f"{EXAMPLES / 'numpy_textbook.py'}:loss")


def test_textbook_overflow_is_the_exp_line() -> None:
    loaded = textbook()
    result = call(loaded, np.array([[1000, 2000, 2500]], np.float32), np.array([0]))
    assert np.isnan(result.losses).all()
    first = result.events[0]
    exp_line = line_of(EXAMPLES / "numpy_textbook.py", "np.exp(")
    assert (first.op, first.kind, first.index) == ("exp", "overflow", (0, 0))
    assert first.source == f"{loaded.file}:{exp_line}"
    assert first.shape == (1, 3)
    # then inf / inf: NaN, on the divide's line
    second = result.events[1]
    assert (second.op, second.kind) == ("divide", "nan")
    assert second.source == f"{loaded.file}:{exp_line + 1}"


@pytest.mark.parametrize(("dtype", "edge"), [
    (np.float16, math.log(65504.0)), (ml_dtypes.bfloat16, math.log(3.3895313892515355e38)),
    (np.float32, math.log(3.4028234663852886e38)), (np.float64, math.log(1.7976931348623157e308)),
])
def test_overflow_is_found_in_every_dtype_at_its_first_position(dtype: Any, edge: float) -> None:
    """exp overflows just past ln(max) of D; numpy's flags do not see float16 and bfloat16
    results rounded to inf, the output check does."""
    below, above = math.floor(edge * 8 - 1) / 8, math.ceil(edge * 8 + 1) / 8
    logits = np.array([[0.0, below, above, above]], dtype=dtype)
    result = call(textbook(), logits, np.array([0]))
    overflow = [e for e in result.events if e.kind == "overflow"]
    assert overflow and overflow[0].op == "exp" and overflow[0].index == (0, 2)


def test_log_of_an_underflowed_probability() -> None:
    subtle = load_function(f"{EXAMPLES / 'numpy_subtle.py'}:loss")
    logits = np.array([[0.0, 0.0, -120.0], [1.0, 2.0, 3.0]])
    labels = np.array([2, 0])
    in32 = call(subtle, logits.astype(np.float32), labels)
    assert in32.losses[0] == np.inf
    # exp(-120) flushes to 0 in float32 (its exact value, about 7.7e-53, is below the
    # smallest subnormal): the flush is named at the exp line, before the log it broke
    flush, event = in32.events
    assert float(np.exp(np.float32(-120.0))) == 0.0 and 0 < mpmath.exp(-120) < 2.0 ** -150
    assert (flush.op, flush.kind, flush.index) == ("exp", "underflow", (0, 2))
    assert flush.source == f"{subtle.file}:{line_of(EXAMPLES / 'numpy_subtle.py', 'np.exp(')}"
    assert (event.op, event.kind, event.index) == ("log", "log_of_zero", (0,))
    assert event.source == f"{subtle.file}:{line_of(EXAMPLES / 'numpy_subtle.py', 'np.log(')}"
    in64 = call(subtle, logits, labels)
    assert in64.events == []
    mpmath.mp.dps = 50
    for row, label, loss in zip(logits, labels, in64.losses, strict=True):
        exact = -(mpmath.mpf(row[label]) - mpmath.log(sum(mpmath.exp(v) for v in row)))
        assert abs(loss - float(exact)) <= 4 * np.finfo(np.float64).eps * float(exact)


def test_a_flush_nothing_takes_the_log_of_is_not_an_event() -> None:
    """In float32 exp(-120) flushes to 0, but at a class that is not the target: the loss
    (ln 2 + ln(1 + exp(-120)) = ln 2 in float32) is right and nothing is reported."""
    subtle = load_function(f"{EXAMPLES / 'numpy_subtle.py'}:loss")
    logits = np.array([[0.0, -120.0, 0.0]], dtype=np.float32)
    result = call(subtle, logits, np.array([0]))
    assert result.events == []
    mpmath.mp.dps = 50
    exact = mpmath.log(2 + mpmath.exp(-120))
    assert abs(result.losses[0] - float(exact)) <= np.finfo(np.float32).eps * float(exact)


def test_division_by_an_exact_zero(write: Write, tmp_path: Path) -> None:
    path = module_file(write, "divide.py", """
        import numpy as np
        def loss(logits, labels):
            spread = logits.max(axis=-1) - logits.min(axis=-1)
            return logits[..., 0] / spread
    """)
    loaded = load_function("divide.py:loss", base=tmp_path)
    result = call(loaded, np.array([[1.0, 2.0], [3.0, 3.0]], np.float32), np.array([0, 1]))
    (event,) = result.events
    assert (event.op, event.kind, event.index) == ("divide", "division_by_zero", (1,))
    assert event.source == f"{loaded.file}:{line_of(path, '/ spread')}"


def test_what_escapes_the_watched_arrays_is_caught_by_numpys_flags(write: Write,
                                                                  tmp_path: Path) -> None:
    """np.asarray copies drop the watch; numpy's error call still names the op and line
    (from the expression the line was executing), without a position."""
    path = module_file(write, "escape.py", """
        import numpy as np
        def loss(logits, labels):
            plain = np.array(logits, dtype=np.float32).view(np.ndarray)
            big = plain * np.float32(1e30)
            return np.exp(plain).sum(axis=-1) + big[..., 0]
    """)
    loaded = load_function("escape.py:loss", base=tmp_path)
    before = (np.geterr(), np.geterrcall())
    result = call(loaded, np.array([[1e10, 0.0]], np.float32), np.array([0]))
    assert [(e.op, e.kind, e.index, e.shape) for e in result.events] == [
        ("multiply", "overflow", (), None), ("exp", "overflow", (), None)]
    assert [e.source for e in result.events] == [
        f"{loaded.file}:{line_of(path, '1e30')}", f"{loaded.file}:{line_of(path, 'np.exp')}"]
    assert (np.geterr(), np.geterrcall()) == before  # numpy's state restored


def test_numpys_flags_name_the_kind(write: Write, tmp_path: Path) -> None:
    """The second net's kinds: numpy's 'invalid value' is nan, 'divide by zero' a pole
    (log_of_zero where the expression is a log)."""
    path = module_file(write, "flags.py", """
        import numpy as np
        def loss(logits, labels):
            plain = np.array(logits).view(np.ndarray)
            gap = plain[..., 0] - plain[..., 0]
            inf = np.exp(plain[..., 1])
            nan = inf - inf
            return np.log(gap) + nan + 1 / gap
    """)
    loaded = load_function("flags.py:loss", base=tmp_path)
    result = call(loaded, np.array([[1.0, 1000.0]]), np.array([0]))
    lines = {n: line_of(path, text) for n, text in
             (("exp", "np.exp"), ("nan", "inf - inf"), ("log", "np.log(gap)"))}
    assert [(e.op, e.kind, e.source) for e in result.events] == [
        ("exp", "overflow", f"{loaded.file}:{lines['exp']}"),
        ("subtract", "nan", f"{loaded.file}:{lines['nan']}"),
        ("log", "log_of_zero", f"{loaded.file}:{lines['log']}"),
        ("divide", "division_by_zero", f"{loaded.file}:{lines['log']}"),
    ]


def test_a_function_that_raises(write: Write, tmp_path: Path) -> None:
    path = module_file(write, "raises.py", """
        def helper(x):
            raise ValueError("labels must be\\n one-hot")
        def loss(logits, labels):
            return helper(logits)
    """)
    loaded = load_function("raises.py:loss", base=tmp_path)
    before = (np.geterr(), np.geterrcall())
    with pytest.raises(InputError) as raised:
        call(loaded, np.ones((1, 2), np.float32), np.array([0]))
    line = line_of(path, "raise ValueError")
    assert raised.value.message == (f"raised ValueError: labels must be one-hot "
                                    f"({loaded.file}:{line})")
    assert isinstance(raised.value.cause, ValueError)
    assert (np.geterr(), np.geterrcall()) == before


class Tensor:
    """Stands for another framework's array (its class's module is what says so)."""


Tensor.__module__ = "torch"


@pytest.mark.parametrize(("returned", "message"), [
    ("np.zeros((2, 2), logits.dtype)",
     "returned an array of shape [2, 2] for logits of shape [2, 3]; expected [2]"),
    ("np.zeros(2, np.int64)", "returned an array of int64, not floating point"),
    ("[0.0, 0.0]", "returned a list, not a numpy array"),
    ("float(logits[0, 0])", "returned a float, not a numpy array"),
    ("TENSOR()", "returned a torch.Tensor, not a numpy array; a torch function runs with "
                 "--framework torch"),
])
def test_bad_answers(returned: str, message: str, write: Write, tmp_path: Path) -> None:
    name = f"answer_{abs(hash(returned))}.py"
    write(name, f"import numpy as np\nTENSOR = None\ndef loss(logits, labels):\n"
                f"    return {returned}\n")
    loaded = load_function(f"{name}:loss", base=tmp_path)
    sys.modules[loaded.function.__module__].TENSOR = Tensor  # type: ignore[attr-defined]
    with pytest.raises(InputError) as raised:
        call(loaded, np.ones((2, 3), np.float32), np.array([0, 1]))
    assert raised.value.message.startswith(message)


def test_a_scalar_and_per_element_answers_are_accepted(write: Write, tmp_path: Path) -> None:
    write("shapes.py", "import numpy as np\ndef mean(logits, labels):\n"
                       "    return np.mean(logits)\n"
                       "def each(logits, labels):\n    return logits * 2\n")
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    assert call(load_function("shapes.py:mean", base=tmp_path), x, np.array([0])).losses == 2.0
    each = call(load_function("shapes.py:each", base=tmp_path), x, np.array([0])).losses
    assert each.tolist() == [[2.0, 4.0, 6.0]]


def test_the_gradient_a_function_gives_is_scaled_by_the_upstream_in_d() -> None:
    stable = load_function(f"{EXAMPLES / 'numpy_stable.py'}:loss")
    logits = np.array([[1.0, 2.0, 3.0], [0.5, -7.0, 100.0]], np.float32)
    labels = np.array([2, 1])
    upstream = 1 / 3
    result = call(stable, logits, labels, upstream=upstream)
    # softmax - onehot, exactly, times the upstream as D holds it
    mpmath.mp.dps = 50
    for row, label, got in zip(logits, labels, result.gradient, strict=True):
        total = sum(mpmath.exp(mpmath.mpf(float(v))) for v in row)
        for c, v in enumerate(row):
            exact = (mpmath.exp(mpmath.mpf(float(v))) / total - (c == label))
            want = float(exact) * float(np.float32(upstream))
            assert abs(got[c] - want) <= 4 * np.finfo(np.float32).eps * max(abs(want), 1e-30)
    assert result.gradient.dtype == np.float64
    assert np.array_equal(result.gradient.astype(np.float32), result.gradient)  # values of D
    # no upstream asked for: no gradient
    assert call(stable, logits, labels).gradient is None


def test_a_gradient_that_overflows_is_watched(write: Write, tmp_path: Path) -> None:
    path = module_file(write, "badgrad.py", """
        import numpy as np
        def loss(logits, labels):
            return logits.sum(axis=-1)
        def gradient(logits, labels):
            return np.exp(logits)
        loss.gradient = gradient
    """)
    loaded = load_function("badgrad.py:loss", base=tmp_path)
    result = call(loaded, np.array([[1.0, 100.0]], np.float32), np.array([0]), upstream=1.0)
    assert result.events == []
    (event,) = result.gradient_events
    assert (event.op, event.kind, event.index) == ("exp", "overflow", (0, 1))
    assert event.source == f"{loaded.file}:{line_of(path, 'np.exp')}"
    assert result.gradient.tolist() == [[float(np.exp(np.float32(1.0))), math.inf]]
