"""A SPEC (``path/to/file.py:NAME`` or ``package.module:NAME``) to the user's function.

Importing a user's file runs its code: only the file or module named is imported (a module
named by its dotted name brings its parent packages, as any import does), once per process.
The file's folder is not put on ``sys.path``. Which framework the function is written in is
read from what its module imports (:func:`detect_framework`).
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import InputError, UsageError
from . import FRAMEWORK_CHOICES
from .adapter import LossFunction

# A file imported once per process, by its resolved path (a scenario and the command line
# naming the same file share one module, and its top-level code runs once).
_FILES: dict[Path, ModuleType] = {}
_LOCK = threading.Lock()
_ROOTS = ("torch", "jax")


@dataclass(frozen=True)
class UserFunction:
    """A user's loss function, loaded.

    ``spec`` is the SPEC as given (results carry it as their ``pipeline``); ``file`` is the
    resolved path of the file holding the function's module (where its frames are found);
    ``shown`` is that file as the user wrote it in SPEC (the ``FILE`` of ``FILE:LINE``)."""

    spec: str
    function: LossFunction
    framework: str
    file: Path | None
    shown: str


def split_spec(spec: str) -> tuple[str, str]:
    """``(target, NAME)``: the SPEC split at its last colon (a Windows drive letter's colon
    stays in the path)."""
    target, colon, name = spec.rpartition(":")
    if not colon or not target or not name:
        raise UsageError(f"--loss-fn {spec!r}: expected FILE.py:NAME or package.module:NAME")
    return target, name


def is_file_spec(target: str) -> bool:
    """A path (``.py``, or holding a folder separator) rather than a dotted module name."""
    return target.endswith(".py") or "/" in target or os.sep in target


def load_function(spec: str, framework: str = "auto", base: Path | None = None) -> UserFunction:
    """Import the function SPEC names and settle its framework.

    Parameters
    ----------
    spec
        ``path/to/file.py:NAME`` (relative to ``base``, else to the working directory) or
        ``package.module:NAME``.
    framework
        ``auto``, ``numpy``, ``torch`` or ``jax``.
    base
        The folder a relative path is taken from (a scenario file's folder).

    Raises
    ------
    InputError
        One line naming SPEC: a missing file, module or name, an import that fails (its
        exception's type, message and the user's ``FILE:LINE``), a name that is not callable.
    UsageError
        An unknown framework, or ``auto`` where the module imports both torch and jax.
    """
    if framework not in FRAMEWORK_CHOICES:
        raise UsageError(f"unknown framework {framework!r}; choose from "
                         f"{', '.join(FRAMEWORK_CHOICES)}")
    target, name = split_spec(spec)
    if is_file_spec(target):
        path = Path(target)
        resolved = (path if path.is_absolute() else (base or Path.cwd()) / path).resolve()
        if not resolved.is_file():
            what = "is a directory" if resolved.is_dir() else "no such file"
            raise InputError(f"{target}: {what}", source=spec)
        module = _import_file(resolved, spec, target)
        file: Path | None = resolved
        shown = target
    else:
        module = _import_module(target, spec)
        module_file = getattr(module, "__file__", None)
        file = Path(module_file).resolve() if module_file else None
        shown = _relative(file) if file is not None else target
    function = _attribute(module, name, spec, shown)
    chosen = detect_framework(module, spec) if framework == "auto" else framework
    return UserFunction(spec, function, chosen, file, shown)


def _relative(file: Path) -> str:
    """A module's file as a path from the working directory where it lies under it."""
    try:
        return str(file.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(file)


def _import_file(path: Path, spec: str, shown: str) -> ModuleType:
    with _LOCK:
        if path in _FILES:
            return _FILES[path]
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
        stem = "".join(c if c.isalnum() else "_" for c in path.stem)
        module_name = f"xentcheck_user_{digest}_{stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise InputError(f"{shown}: cannot be imported as a Python file", source=spec)
        module = importlib.util.module_from_spec(loader_spec)
        # registered while it runs, as an import does (dataclasses and pickling look it up)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException as exc:
            del sys.modules[module_name]
            if not isinstance(exc, Exception):
                raise
            raise InputError(import_failure(exc, path, shown), source=spec,
                             cause=exc) from exc
        _FILES[path] = module
        return module


def _import_module(target: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        missing = exc.name or target
        if target == missing or target.startswith(f"{missing}."):
            raise InputError(f"no module named {missing!r} (a file is given as "
                             "path/to/file.py:NAME)", source=spec) from None
        raise InputError(import_failure(exc, None, target), source=spec,
                         cause=exc) from exc
    except Exception as exc:  # the module's own code failed
        module_file = getattr(sys.modules.get(target), "__file__", None)
        path = Path(module_file).resolve() if module_file else None
        raise InputError(import_failure(exc, path, target), source=spec,
                         cause=exc) from exc


def import_failure(exc: BaseException, path: Path | None, shown: str) -> str:
    """``importing it raised TYPE: message (FILE:LINE)``, the line the user's own."""
    if isinstance(exc, SyntaxError):
        line = f" ({shown}:{exc.lineno})" if exc.lineno else ""
        return f"cannot import it: SyntaxError: {exc.msg}{line}"
    where = user_line(exc, path, shown)
    return f"importing it raised {describe(exc)}{f' ({where})' if where else ''}"


def describe(exc: BaseException) -> str:
    """``TYPE: message`` on one line."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def user_line(exc: BaseException, path: Path | None, shown: str) -> str | None:
    """``FILE:LINE`` of the innermost frame of ``exc``'s traceback in the user's file."""
    if path is None:
        return None
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if same_file(frame.filename, path):
            found = frame.lineno
    return None if found is None else f"{shown}:{found}"


def same_file(filename: str, path: Path) -> bool:
    """Whether a frame's file name is ``path`` (resolved)."""
    if filename == str(path):
        return True
    if filename.startswith("<"):
        return False
    try:
        return Path(filename).resolve() == path
    except OSError:
        return False


def _attribute(module: ModuleType, name: str, spec: str, shown: str) -> LossFunction:
    value: Any = module
    for part in name.split("."):
        if not hasattr(value, part):
            names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
            hint = difflib.get_close_matches(name, names, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise InputError(f"{shown} has no {name!r}{suggestion}", source=spec)
        value = getattr(value, part)
    if not callable(value):
        raise InputError(f"{name!r} in {shown} is not a function (a value of type "
                         f"{type(value).__name__})", source=spec)
    function: LossFunction = value
    return function


def imported_frameworks(module: ModuleType) -> set[str]:
    """torch and jax among what ``module`` imports: its source's import statements (also
    inside functions), and the modules and functions its globals hold."""
    found: set[str] = set()
    for value in vars(module).values():
        owner = value.__name__ if isinstance(value, ModuleType) else getattr(
            value, "__module__", None)
        if isinstance(owner, str) and owner.split(".")[0] in _ROOTS:
            found.add(owner.split(".")[0])
    source_file = getattr(module, "__file__", None)
    if source_file and source_file.endswith(".py"):
        try:
            tree = ast.parse(Path(source_file).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            tree = None
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            found.update(root for root in roots if root in _ROOTS)
    return found


def detect_framework(module: ModuleType, spec: str) -> str:
    """``--framework auto``: torch or jax when the module imports it, else numpy."""
    found = imported_frameworks(module)
    if len(found) > 1:
        raise UsageError(f"--loss-fn {spec}: its module imports both torch and jax; say which "
                         "the function uses with --framework torch or --framework jax (in a "
                         "scenario: functions: [{spec: ..., framework: ...}])")
    return found.pop() if found else "numpy"


FUNCTION_FORM = ("a SPEC (path/to/file.py:NAME, relative to the scenario file, or "
                 "package.module:NAME), {spec: SPEC, framework: " + "|".join(FRAMEWORK_CHOICES)
                 + "}, or a list of them")


def parse_functions(value: Any, base: Path) -> tuple[UserFunction, ...]:
    """``functions:``: users' loss functions, each imported (running its module's code) and
    its framework settled (``auto`` unless the item says)."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not items:
        raise InputError(f"must be {FUNCTION_FORM}", field="functions")
    loaded: dict[str, UserFunction] = {}
    for item in items:
        if isinstance(item, dict):
            unknown = set(item) - {"spec", "framework"}
            if unknown or not isinstance(item.get("spec"), str):
                raise InputError(f"each item must be {FUNCTION_FORM}", field="functions")
            spec, framework = item["spec"], item.get("framework", "auto")
            if framework not in FRAMEWORK_CHOICES:
                raise InputError(f"framework {framework!r} is not one of "
                                 f"{', '.join(FRAMEWORK_CHOICES)}", field="functions")
        elif isinstance(item, str):
            spec, framework = item, "auto"
        else:
            raise InputError(f"each item must be {FUNCTION_FORM}", field="functions")
        try:
            loaded[spec] = load_function(spec, framework, base)
        except InputError as exc:
            raise InputError(str(exc), field="functions", cause=exc.cause) from None
        except UsageError as exc:
            raise InputError(str(exc).removeprefix("--loss-fn "), field="functions") from None
    return tuple(loaded.values())
