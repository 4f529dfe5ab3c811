"""xentcheck's numbers for a recorded framework case, computed the way the evaluator computes
them: the forward pass block by block, the backward pass from each block's own forward
values, then the pipeline's batch reduction."""

from __future__ import annotations

import numpy as np

from xentcheck.case import Case
from xentcheck.execution import run_with_gradient
from xentcheck.pipelines import available
from xentcheck.precision import Precision


def xentcheck_result(case: Case, pipeline_name: str, dtype: str,
                     block_elements: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The loss (the per-example array for ``none``) and the gradient (None where the
    pipeline has none), both in float64."""
    pipeline = next(p for p in available(case.spec.family, case.spec.from_logits, every=True)
                    if p.name == pipeline_name)
    loss, _, gradient = run_with_gradient(pipeline, Precision(dtype), case, block_elements)
    return np.asarray(loss, dtype=np.float64), gradient
