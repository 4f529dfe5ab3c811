"""Loading one array from a file: ``.npy``, ``.npz``, ``.csv`` or ``.safetensors``.

Every failure becomes an :class:`~xentcheck.errors.InputError` naming the file and the
field; nothing is ever unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import csv
import json
import mmap
import sys
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .errors import InputError
from .precision import FloatArray

SUFFIXES = (".npy", ".npz", ".csv", ".safetensors")
# Formats that hold several named arrays, so that a key picks one.
KEYED_SUFFIXES = (".npz", ".safetensors")
# Dtypes that raw 2-byte values (.npy's |V2, all numpy can write for ml_dtypes' bfloat16)
# may be read as.
RAW_DTYPES: tuple[str, ...] = ("bfloat16", "float16")
# ml_dtypes' floating types an input may hold (numpy calls their kind "V"): a .safetensors
# file names them (BF16, F8_E4M3, F8_E5M2)
ML_FLOAT_TYPES: frozenset[str] = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2"})


def is_float(dtype: np.dtype[Any]) -> bool:
    """Whether values of ``dtype`` are floating-point numbers (numpy's or ml_dtypes')."""
    return dtype.kind == "f" or dtype.name in ML_FLOAT_TYPES


def load_array(
    path: Path, *, key: str | None, source: str, field: str, dtype: str | None = None,
    option: str | None = None,
) -> FloatArray:
    """Load the array stored at ``path`` (``key`` picks one from .npz/.safetensors).

    Parameters
    ----------
    path
        The file. Its suffix chooses the format.
    key
        Name of the array inside an ``.npz`` or ``.safetensors`` file; may be omitted when
        the file holds exactly one array. Given for another format, it is an error.
    source, field
        Where the path was given, for error messages.
    dtype
        One of :data:`RAW_DTYPES`: the type of a file's raw 2-byte values (numpy saves
        ml_dtypes' bfloat16 as ``|V2``, which reads back as bytes). A file whose values
        already have a type must have this one.
    option
        The command-line option that gave the path (``--logits``), so that messages name
        ``--logits-key`` and ``--logits-dtype``; None for a scenario's ``key:``/``dtype:``.

    Returns
    -------
    numpy.ndarray
        ``.npy`` arrays are memory-mapped, so large inputs are read as they are used.
    """

    def fail(message: str) -> InputError:
        return InputError(f"{path}: {message}", source=source, field=field)

    key_name = f"{option}-key" if option else "'key'"
    dtype_name = f"{option}-dtype" if option else "'dtype'"

    if not path.exists():
        raise fail("no such file")
    if path.is_dir():
        raise fail("is a directory, not a file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise fail(f"unknown file type {suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise fail("the file is empty")
    if key is not None and suffix not in KEYED_SUFFIXES:
        raise fail(f"{key_name} picks an array in an .npz or .safetensors file; a {suffix} "
                   "file holds just one (leave the key out)")
    try:
        if suffix == ".npy":
            array = _load_npy(path, fail)
        elif suffix == ".npz":
            array = _load_npz(path, key, fail)
        elif suffix == ".csv":
            array = _load_csv(path, fail)
        else:
            array = _load_safetensors(path, key, fail)
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        # .npz members: numpy says "Object arrays cannot be loaded when allow_pickle=False"
        # for pickles, and "cannot reshape"/"EOF" for truncated files.
        raise fail(f"cannot read it ({_first_line(exc)})") from None
    if dtype is not None:
        return _as_raw_dtype(array, dtype, fail, dtype_name)
    if _raw(array.dtype) and array.dtype.itemsize == 2:
        picked = f", key: {key}" if key is not None else ""
        hint = (f"{dtype_name} bfloat16" if option else
                f"{{path: {path.name}{picked}, dtype: bfloat16}}")
        raise fail(f"holds raw 2-byte values (|V2): probably bfloat16 saved with numpy and "
                   f"ml_dtypes, a type .npy cannot name; say so with {hint} (or float16), or "
                   "save it as .safetensors, which names bfloat16")
    if array.dtype.kind not in "iub" and not is_float(array.dtype):
        raise fail(f"holds {array.dtype} values; numbers are needed")
    return array


def _raw(dtype: np.dtype[Any]) -> bool:
    """Plain bytes (``|V2``): not a structured type, nor ml_dtypes' types (also kind V)."""
    return dtype.type is np.void and dtype.names is None


def _as_raw_dtype(array: FloatArray, name: str, fail: Any, dtype_name: str) -> FloatArray:
    """``array``'s raw values viewed as ``name`` (no copy: a memory map stays one)."""
    if name not in RAW_DTYPES:
        raise fail(f"{dtype_name} {name!r} is not one of {', '.join(RAW_DTYPES)}")
    target = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(np.float16)
    if array.dtype == target:
        return array
    if not _raw(array.dtype):
        raise fail(f"holds {array.dtype} values, not {name}: {dtype_name} names the type of raw "
                   "values (|V2) only; leave it out (to evaluate in a dtype, use --dtype)")
    if array.dtype.itemsize != target.itemsize:
        raise fail(f"holds raw {array.dtype.itemsize}-byte values (|V{array.dtype.itemsize}); "
                   f"{name} values have {target.itemsize} bytes")
    return array.view(target)


def _load_npy(path: Path, fail: Any) -> FloatArray:
    """A memory map of a .npy file, after checking its header against its size.

    numpy alone says "mmap length is greater than file size" for a truncated file and
    talks about pickles for a file that is no .npy at all: say what is wrong instead.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
        except ValueError:
            raise fail("not a .npy file (it does not begin with the .npy magic bytes "
                       "\\x93NUMPY)") from None
        try:
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"format version {version[0]}.{version[1]} is not supported")
        except ValueError as exc:
            raise fail(f"unreadable .npy header ({_first_line(exc)})") from None
        offset = handle.tell()
    if dtype.hasobject:
        raise fail("holds Python objects (pickled), which xentcheck never loads; save numbers")
    count = int(np.prod(shape, dtype=np.int64))
    needed, held = count * dtype.itemsize, size - offset
    if held < needed:
        raise fail(f"truncated: its header says {count:,} {dtype} values = {needed:,} bytes, "
                   f"the file holds {held:,}")
    if needed == 0:
        return np.zeros(shape, dtype)  # nothing to map (mmap refuses an empty range)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _pick(names: list[str], key: str | None, fail: Any) -> str:
    if key is None:
        if len(names) == 1:
            return names[0]
        raise fail(f"holds {len(names)} arrays ({', '.join(names)}); say which with 'key'")
    if key not in names:
        raise fail(f"has no array {key!r}; it holds: {', '.join(names) or '(none)'}")
    return key


def _load_npz(path: Path, key: str | None, fail: Any) -> FloatArray:
    # Our own handle: np.load leaves its file open when the archive turns out corrupt.
    with path.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
        name = _pick(list(archive.files), key, fail)
        return np.asarray(archive[name])


def _load_csv(path: Path, fail: Any) -> FloatArray:
    values = _read_csv(path, fail)[1]
    return values[:, 0] if values.shape[1] == 1 else values


def _read_csv(path: Path, fail: Any) -> tuple[list[str] | None, FloatArray]:
    """The header (None when the first row is numbers) and the numbers, as a 2-D array."""
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if not rows:
        raise fail("the file has no rows")
    header = None
    if not all(_is_number(cell) for cell in rows[0]):
        header = [cell.strip() for cell in rows[0]]
        rows = rows[1:]
        if not rows:
            raise fail("the file has a header but no data rows")
    width = len(rows[0])
    values = np.empty((len(rows), width))
    first = 2 if header else 1  # rows are numbered as in the file
    for r, row in enumerate(rows):
        if len(row) != width:
            raise fail(f"row {r + first} has {len(row)} columns, the first row has {width}")
        for c, cell in enumerate(row, start=1):
            if not _is_number(cell):
                raise fail(f"row {r + first}, column {c}: {cell.strip()!r} is not a number")
            values[r, c - 1] = float(cell)
    return header, values


def load_csv_with_labels(
    path: Path, column: str | int, *, source: str, field: str
) -> tuple[FloatArray, FloatArray]:
    """A CSV whose rows hold the logits and, in ``column`` (a header name or a 0-based
    index, negative from the end), the label: ``(logits, labels)``."""

    def fail(message: str) -> InputError:
        return InputError(f"{path}: {message}", source=source, field=field)

    if path.suffix.lower() != ".csv":
        raise fail("a label column needs the logits in a .csv file")
    if not path.is_file():
        raise fail("no such file")
    header, values = _read_csv(path, fail)
    width = values.shape[1]
    if isinstance(column, str) and not column.lstrip("-").isdigit():
        if header is None or column not in header:
            names = ", ".join(header) if header else "none (the file has no header)"
            raise fail(f"has no column {column!r}; its columns: {names}")
        index = header.index(column)
    else:
        index = int(column)
        if not -width <= index < width:
            raise fail(f"has {width} columns; column index {index} is out of range")
        index %= width
    if width < 3:
        raise fail("needs a label column and at least two logit columns")
    return np.delete(values, index, axis=1), values[:, index]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


# safetensors' dtype names (always little-endian) that numpy (with ml_dtypes) can map; a
# tensor of any other type is read through the library instead.
_SAFETENSORS_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"), "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


def _load_safetensors(path: Path, key: str | None, fail: Any) -> FloatArray:
    """A memory map of one tensor of a .safetensors file (read as it is used, like a .npy:
    a language model's 1 GiB of logits is never in memory whole), after the library has
    checked the header (offsets in order, sizes matching shapes and dtypes)."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise fail("reading .safetensors needs: pip install 'xentcheck[safetensors]'") from None
    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise fail(f"cannot read it ({_first_line(exc)})") from None
    with handle as tensors:
        name = _pick(list(tensors.keys()), key, fail)
        mapped = _map_safetensor(path, name)
        if mapped is not None:
            return mapped
        try:
            return np.asarray(tensors.get_tensor(name))
        except Exception as exc:
            raise fail(f"cannot read tensor {name!r} ({_first_line(exc)})") from None


def _map_safetensor(path: Path, name: str) -> FloatArray | None:
    """Tensor ``name`` of a header the library accepted, memory-mapped; None where a map
    cannot hold it (an empty tensor, a dtype numpy lacks, a big-endian machine)."""
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        entry = json.loads(handle.read(length))[name]
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    shape = tuple(int(n) for n in entry["shape"])
    begin, end = (int(n) for n in entry["data_offsets"])
    if dtype is None or begin == end or sys.byteorder != "little":
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + length + begin, shape=shape)


def release_pages(mapped: FloatArray, view: FloatArray) -> None:
    """Let the kernel drop the pages of a memory-mapped file under ``view``.

    Streaming a file through a memory map reads each page once; without this the pages stay
    mapped, and counted in the process's resident memory, until the map is closed. Dropping
    them is safe: a page touched again is read back from the page cache. ``mapped`` is the
    array :func:`load_array` returned, ``view`` a slice of it. Anything else is left alone.
    """
    mm = getattr(mapped, "_mmap", None)
    if not isinstance(mapped, np.memmap) or mm is None or not hasattr(mm, "madvise"):
        return
    delta = np.asarray(view).ctypes.data - mapped.ctypes.data
    start = mapped.offset % mmap.ALLOCATIONGRANULARITY + delta
    aligned = start - start % mmap.PAGESIZE
    length = np.asarray(view).nbytes + (start - aligned)
    if length > 0 and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, aligned, length)
