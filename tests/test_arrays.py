"""Array files: each format, and each way a file can be bad (one InputError, never unpickled)."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from xentcheck.arrays import load_array
from xentcheck.errors import InputError


def load(path: Path, key: str | None = None) -> np.ndarray:
    return load_array(path, key=key, source="s.yaml", field="logits")


def test_npy_is_memory_mapped(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    array = load(tmp_path / "x.npy")
    assert isinstance(array, np.memmap)
    assert array.dtype == np.float32 and array.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_npz_single_array_needs_no_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", only=np.array([1.0, 2.0]))
    assert load(tmp_path / "x.npz").tolist() == [1.0, 2.0]


def test_npz_missing_key_lists_the_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", a=np.zeros(2), b=np.ones(2))
    with pytest.raises(InputError, match="has no array 'c'; it holds: a, b"):
        load(tmp_path / "x.npz", "c")
    with pytest.raises(InputError, match="say which with 'key'"):
        load(tmp_path / "x.npz")


def test_csv_with_and_without_header(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("a,b\n1,2\n3,4.5\n")
    (tmp_path / "n.csv").write_text("1,2\n3,4.5\n")
    (tmp_path / "c.csv").write_text("1\n2\n")
    assert load(tmp_path / "h.csv").tolist() == [[1, 2], [3, 4.5]]
    assert load(tmp_path / "n.csv").tolist() == [[1, 2], [3, 4.5]]
    assert load(tmp_path / "c.csv").tolist() == [1, 2]


def test_safetensors_keys(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"x": np.array([1.0], dtype=np.float32), "y": np.array([2.0])},
              str(tmp_path / "t.safetensors"))
    assert load(tmp_path / "t.safetensors", "y").tolist() == [2.0]
    with pytest.raises(InputError, match="it holds: x, y"):
        load(tmp_path / "t.safetensors", "z")


def make_bad(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "missing.npy"
    if kind == "directory":
        (tmp_path / "d.npy").mkdir()
        return tmp_path / "d.npy"
    if kind == "empty":
        (tmp_path / "e.npy").write_bytes(b"")
        return tmp_path / "e.npy"
    if kind == "truncated":
        np.save(tmp_path / "t.npy", np.zeros((100, 100)))
        data = (tmp_path / "t.npy").read_bytes()
        (tmp_path / "t.npy").write_bytes(data[: len(data) // 2])
        return tmp_path / "t.npy"
    if kind == "garbage":
        (tmp_path / "g.npy").write_bytes(b"this is not a numpy file at all")
        return tmp_path / "g.npy"
    if kind == "header":
        (tmp_path / "h.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{garbage header}")
        return tmp_path / "h.npy"
    if kind == "short":
        (tmp_path / "s.npy").write_bytes(b"\x93NU")
        return tmp_path / "s.npy"
    if kind == "pickle":
        np.save(tmp_path / "p.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        return tmp_path / "p.npy"
    if kind == "strings":
        np.save(tmp_path / "s.npy", np.array(["a", "b"]))
        return tmp_path / "s.npy"
    if kind == "suffix":
        (tmp_path / "x.txt").write_text("1,2")
        return tmp_path / "x.txt"
    if kind == "bad_zip":
        (tmp_path / "z.npz").write_bytes(b"PK\x03\x04 broken")
        return tmp_path / "z.npz"
    if kind == "csv_cell":
        (tmp_path / "c.csv").write_text("1,2\n3,x\n")
        return tmp_path / "c.csv"
    if kind == "csv_ragged":
        (tmp_path / "r.csv").write_text("1,2\n3\n")
        return tmp_path / "r.csv"
    if kind == "safetensors":
        (tmp_path / "b.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
        return tmp_path / "b.safetensors"
    raise AssertionError(kind)


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "is empty"),
    ("truncated", "truncated: its header says 10,000 float64 values = 80,000 bytes"),
    ("garbage", "not a .npy file (it does not begin with the .npy magic bytes"),
    ("pickle", "holds Python objects (pickled), which xentcheck never loads"),
    ("header", "unreadable .npy header"),
    ("short", "not a .npy file"),
    ("strings", "numbers are needed"),
    ("suffix", "unknown file type"),
    ("bad_zip", "cannot read it"),
    ("csv_cell", "row 2, column 2: 'x' is not a number"),
    ("csv_ragged", "row 2 has 1 columns"),
    ("safetensors", "cannot read it"),
])
def test_bad_files_are_one_input_error(tmp_path: Path, kind: str, message: str) -> None:
    path = make_bad(tmp_path, kind)
    with pytest.raises(InputError) as caught:
        load(path)
    assert message in str(caught.value)
    assert caught.value.source == "s.yaml" and caught.value.field == "logits"
    assert "\n" not in str(caught.value)


# -inf logits are masked entries, not bad values (tests/test_masked_logits.py)
@pytest.mark.parametrize(("bad", "shown"), [(np.inf, "inf"), (np.nan, "nan")])
def test_streamed_validation_finds_the_first_bad_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: float, shown: str
) -> None:
    from xentcheck import case_validation as scenario

    x = np.zeros((50, 7), dtype=np.float32)
    x[37, 4] = bad
    x[45, 1] = np.nan  # a later one is not the one reported
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(scenario, "_CHECK_VALUES", 7 * 3)  # 17 blocks of 3 rows
    logits = load(tmp_path / "x.npy")
    with pytest.raises(InputError, match=rf"holds {shown} at index \[37, 4\]"):
        scenario.make_case(name="s", logits=logits, labels=np.zeros(50, dtype=np.int64))


def test_memory_mapped_input_gives_the_in_memory_findings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xentcheck import execution
    from xentcheck.case_validation import make_case
    from xentcheck.evaluator import evaluate
    from xentcheck.pipelines import textbook
    from xentcheck.precision import precisions_for

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((300, 64)) * 30).astype(np.float32)
    y = rng.integers(0, 64, 300)
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(execution, "BLOCK_ELEMENTS", 64 * 16)  # pages released block by block
    mapped = make_case(name="m", logits=load(tmp_path / "x.npy"), labels=y)
    assert isinstance(mapped.logits, np.memmap)
    in_memory = make_case(name="m", logits=x.copy(), labels=y)
    dtypes = precisions_for(["float16", "float32"])
    a = evaluate(mapped, dtypes, textbook("softmax", True))
    b = evaluate(in_memory, dtypes, textbook("softmax", True))
    assert a.reference.loss == b.reference.loss
    for fa, fb in zip(a.findings, b.findings, strict=True):
        assert (fa.loss, fa.flags, fa.first_bad) == (fb.loss, fb.flags, fb.first_bad) or (
            fa.loss != fa.loss and fb.loss != fb.loss)


def test_csv_label_column_by_name_or_index(tmp_path: Path) -> None:
    from xentcheck.arrays import load_csv_with_labels

    (tmp_path / "d.csv").write_text("a,b,label,c\n1,2,0,3\n4,5,2,6\n")
    logits, labels = load_csv_with_labels(tmp_path / "d.csv", "label", source="s", field="f")
    assert logits.tolist() == [[1, 2, 3], [4, 5, 6]] and labels.tolist() == [0, 2]
    logits, labels = load_csv_with_labels(tmp_path / "d.csv", "-1", source="s", field="f")
    assert labels.tolist() == [3, 6]
    with pytest.raises(InputError, match="has no column 'target'; its columns: a, b, label, c"):
        load_csv_with_labels(tmp_path / "d.csv", "target", source="s", field="f")
    with pytest.raises(InputError, match="column index 7 is out of range"):
        load_csv_with_labels(tmp_path / "d.csv", 7, source="s", field="f")


def test_csv_label_column_in_scenarios_and_cli(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from xentcheck.cli import cli
    from xentcheck.scenario import load_scenarios

    (tmp_path / "d.csv").write_text("x0,x1,x2,y\n0,-40,1,0\n3,2,1,2\n")
    (tmp_path / "s.yaml").write_text("logits: d.csv\nlabels: {column: y}\n")
    (scenario,) = load_scenarios(tmp_path / "s.yaml")
    assert scenario.case.labels.tolist() == [0, 2] and scenario.case.shape == (2, 3)
    result = CliRunner().invoke(cli, ["run", "--logits", str(tmp_path / "d.csv"),
                                      "--label-column", "y", "--format", "json",
                                      "--dtype", "float64"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["scenarios"][0]["shape"] == [2, 3]


def test_a_truncated_npy_says_how_much_is_missing(tmp_path: Path) -> None:
    # numpy's own message was "mmap length is greater than file size"
    np.save(tmp_path / "t.npy", np.zeros((100, 100)))
    whole = (tmp_path / "t.npy").read_bytes()
    header = len(whole) - 100 * 100 * 8  # the rest is the header
    (tmp_path / "t.npy").write_bytes(whole[:-8])  # one value short
    with pytest.raises(InputError) as caught:
        load(tmp_path / "t.npy")
    assert str(caught.value).endswith(
        "t.npy: truncated: its header says 10,000 float64 values = 80,000 bytes, the file "
        f"holds {len(whole) - 8 - header:,}")
    assert len(whole) - 8 - header == 79_992


def save_bfloat16_npy(path: Path, values: list[list[float]]) -> np.ndarray:
    """What a user does: numpy + ml_dtypes, which .npy stores as raw 2-byte values."""
    array = np.array(values, dtype=ml_dtypes.bfloat16)
    np.save(path, array)
    assert np.load(path).dtype == np.dtype("V2")  # the header cannot name bfloat16
    return array


def test_a_bfloat16_npy_says_what_it_probably_is(tmp_path: Path) -> None:
    save_bfloat16_npy(tmp_path / "b.npy", [[2500.0, 1.0]])
    with pytest.raises(InputError) as caught:
        load(tmp_path / "b.npy")
    message = str(caught.value)
    assert "holds raw 2-byte values (|V2): probably bfloat16 saved with numpy and ml_dtypes" \
        in message
    assert "{path: b.npy, dtype: bfloat16}" in message and ".safetensors" in message
    np.savez(tmp_path / "b.npz", x=np.load(tmp_path / "b.npy"), y=np.zeros(1))
    with pytest.raises(InputError, match=r"say so with \{path: b.npz, key: x, dtype: bf"):
        load(tmp_path / "b.npz", "x")
    with pytest.raises(InputError, match="say so with --logits-dtype bfloat16"):
        load_array(tmp_path / "b.npy", key=None, source="s", field="--logits",
                   option="--logits")


def test_raw_2_byte_values_read_as_the_dtype_named(tmp_path: Path) -> None:
    original = save_bfloat16_npy(tmp_path / "b.npy", [[2500.0, 1.0], [-3.5, 0.0078125]])
    array = load_array(tmp_path / "b.npy", key=None, source="s", field="logits",
                       dtype="bfloat16")
    assert isinstance(array, np.memmap)  # still memory-mapped, not copied
    assert array.dtype == np.dtype(ml_dtypes.bfloat16)
    assert array.tobytes() == original.tobytes()
    assert np.asarray(array, dtype=np.float64).tolist() == [[2496.0, 1.0], [-3.5, 0.0078125]]
    # read as float16 instead: the same bits, not a conversion
    as_half = load_array(tmp_path / "b.npy", key=None, source="s", field="logits",
                         dtype="float16")
    assert as_half.view(np.uint16).tolist() == original.view(np.uint16).tolist()
    # a file whose values already have the type named is taken as it is
    np.save(tmp_path / "h.npy", np.array([1.5], dtype=np.float16))
    assert load_array(tmp_path / "h.npy", key=None, source="s", field="logits",
                      dtype="float16").tolist() == [1.5]


@pytest.mark.parametrize(("array", "dtype", "message"), [
    (np.zeros(3, dtype="V4"), "bfloat16", "holds raw 4-byte values (|V4); bfloat16 values have 2"),
    (np.zeros(3, dtype="V1"), "float16", "holds raw 1-byte values (|V1); float16 values have 2"),
    (np.zeros(3, dtype=np.float32), "bfloat16", "holds float32 values, not bfloat16"),
    (np.zeros(3, dtype=np.float16), "bfloat16", "holds float16 values, not bfloat16"),
    (np.zeros(3, dtype=[("a", "<f2")]), "float16", "not float16"),
])
def test_only_raw_values_of_the_right_size_are_viewed(
    tmp_path: Path, array: np.ndarray, dtype: str, message: str
) -> None:
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(InputError, match=re.escape(message)):
        load_array(tmp_path / "x.npy", key=None, source="s", field="logits", dtype=dtype)


@pytest.mark.parametrize("name", ["x.npy", "x.csv"])
def test_a_key_for_a_single_array_file_is_an_error(tmp_path: Path, name: str) -> None:
    # --logits-key on a .npy was silently ignored
    if name.endswith(".npy"):
        np.save(tmp_path / name, np.zeros(2))
    else:
        (tmp_path / name).write_text("1,2\n")
    with pytest.raises(InputError, match=r"'key' picks an array in an \.npz or \.safetensors"):
        load(tmp_path / name, "logits")
    with pytest.raises(InputError, match="--logits-key picks an array"):
        load_array(tmp_path / name, key="logits", source="s", field="--logits",
                   option="--logits")


@pytest.mark.parametrize("dtype", [
    np.float16, np.float32, np.float64, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2, np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint16,
    np.uint32, np.uint64, np.bool_,
])
def test_safetensors_is_memory_mapped(tmp_path: Path, dtype: type) -> None:
    # a 1 GiB file of logits must be read as it is used, as a .npy is, not loaded whole;
    # the map holds what was written, for every type both can name
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    values = (rng.standard_normal((3, 5)) * 50).astype(dtype)
    save_file({"a": np.arange(3, dtype=np.int64), "logits": values, "z": np.ones(1)},
              str(tmp_path / "t.safetensors"))
    from xentcheck.arrays import _map_safetensor

    # fp8 inputs are not accepted (yet) as logits: the map is checked on its own for them
    fp8 = np.dtype(dtype).name.startswith("float8")
    array = (_map_safetensor(tmp_path / "t.safetensors", "logits") if fp8
             else load(tmp_path / "t.safetensors", "logits"))
    assert isinstance(array, np.memmap)
    assert array.dtype == values.dtype and array.shape == values.shape
    assert array.tobytes() == values.tobytes()


def test_safetensors_edge_shapes(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"empty": np.zeros((0, 4), np.float32), "scalar": np.array(2.5)},
              str(tmp_path / "t.safetensors"))
    empty = load(tmp_path / "t.safetensors", "empty")
    assert empty.shape == (0, 4) and empty.dtype == np.float32
    scalar = load(tmp_path / "t.safetensors", "scalar")
    assert scalar.shape == () and float(scalar) == 2.5
