"""Loading one array from a file: ``.npy``, ``.npz``, ``.csv`` or ``.safetensors``.

Every failure becomes an :class:`~xentcheck.errors.InputError` naming the file and the
field; nothing is ever unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import csv
import mmap
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .errors import InputError
from .precision import FloatArray

SUFFIXES = (".npy", ".npz", ".csv", ".safetensors")


def load_array(path: Path, *, key: str | None, source: str, field: str) -> FloatArray:
    """Load the array stored at ``path`` (``key`` picks one from .npz/.safetensors).

    Parameters
    ----------
    path
        The file. Its suffix chooses the format.
    key
        Name of the array inside an ``.npz`` or ``.safetensors`` file; may be omitted when
        the file holds exactly one array.
    source, field
        Where the path was given, for error messages.

    Returns
    -------
    numpy.ndarray
        ``.npy`` arrays are memory-mapped, so large inputs are read as they are used.
    """

    def fail(message: str) -> InputError:
        return InputError(f"{path}: {message}", source=source, field=field)

    if not path.exists():
        raise fail("no such file")
    if path.is_dir():
        raise fail("is a directory, not a file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise fail(f"unknown file type {suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise fail("the file is empty")
    try:
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            array = _load_npz(path, key, fail)
        elif suffix == ".csv":
            array = _load_csv(path, fail)
        else:
            array = _load_safetensors(path, key, fail)
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        # numpy says "Object arrays cannot be loaded when allow_pickle=False" for pickles,
        # and "cannot reshape"/"EOF" for truncated files.
        raise fail(f"cannot read it ({_first_line(exc)})") from None
    if array.dtype.kind not in "fiub" and array.dtype != np.dtype(ml_dtypes.bfloat16):
        raise fail(f"holds {array.dtype} values; numbers are needed")
    return array


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


def _load_safetensors(path: Path, key: str | None, fail: Any) -> FloatArray:
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
        try:
            return np.asarray(tensors.get_tensor(name))
        except Exception as exc:
            raise fail(f"cannot read tensor {name!r} ({_first_line(exc)})") from None


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
