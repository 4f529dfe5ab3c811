"""Users' own loss functions (``--loss-fn FILE.py:NAME``) as pipelines: one adapter per
framework (:mod:`.adapter` fixes their contract), the loading of a SPEC
(:mod:`.loading`), and the pipeline the evaluator runs them as (:mod:`.pipeline`).

Adapters are imported here lazily: a numpy user never needs torch or jax installed.
"""

from __future__ import annotations

import importlib
import importlib.util

from ..errors import UsageError
from .adapter import Adapter

FRAMEWORKS: tuple[str, ...] = ("numpy", "torch", "jax")
# --framework: "auto" looks at what the function's module imports
FRAMEWORK_CHOICES: tuple[str, ...] = ("auto", *FRAMEWORKS)

# framework -> (the adapter's module in this package, its class)
_ADAPTERS: dict[str, tuple[str, str]] = {
    "numpy": ("numpy_adapter", "NumpyAdapter"),
    "torch": ("torch_adapter", "TorchAdapter"),
    "jax": ("jax_adapter", "JaxAdapter"),
}


def adapter_for(framework: str) -> Adapter:
    """The adapter that runs a user's function written with ``framework``.

    Raises
    ------
    UsageError
        For an unknown framework, or one that is not installed (naming the extra that
        installs it: ``pip install 'xentcheck[torch]'``).
    """
    if framework not in _ADAPTERS:
        raise UsageError(f"unknown framework {framework!r}; choose from "
                         f"{', '.join(FRAMEWORK_CHOICES)}")
    if framework != "numpy" and importlib.util.find_spec(framework) is None:
        raise UsageError(f"{framework} is not installed; a {framework} loss function needs "
                         f"it: pip install 'xentcheck[{framework}]'")
    module_name, class_name = _ADAPTERS[framework]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{module_name}":
            raise UsageError(f"this xentcheck has no {framework} adapter") from None
        if exc.name is not None and exc.name.split(".")[0] == framework:
            raise UsageError(f"{framework} is not installed; a {framework} loss function "
                             f"needs it: pip install 'xentcheck[{framework}]'") from None
        raise
    adapter: Adapter = getattr(module, class_name)()
    return adapter
