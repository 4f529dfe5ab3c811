"""xentcheck's numbers for a recorded framework case, computed the way the evaluator computes
them: the forward pass block by block, the backward pass from each block's own forward
values, then the pipeline's batch reduction."""

from __future__ import annotations

import numpy as np

from xentcheck.case import Case
from xentcheck.execution import Denominators, PipelineRun, blocks
from xentcheck.pipelines import available
from xentcheck.precision import Precision


def xentcheck_result(case: Case, pipeline_name: str, dtype: str,
                     block_elements: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The loss (the per-example array for ``none``) and the gradient (None where the
    pipeline has none), both in float64."""
    pipeline = next(p for p in available(case.spec.family, case.spec.from_logits, every=True)
                    if p.name == pipeline_name)
    denominators = Denominators(np.zeros(case.classes))
    for block in blocks(case):
        denominators.add(case, block)
    run = PipelineRun(pipeline, Precision(dtype))
    parts = []
    for block in blocks(case, block_elements):
        outcome = run.run_block(case, block, denominators)
        run.absorb(outcome)
        if outcome.gradient is not None:
            parts.append(np.asarray(outcome.gradient, dtype=np.float64))
    loss, _ = run.finish(case, denominators)
    gradient = np.concatenate(parts) if parts else None
    return np.asarray(loss, dtype=np.float64), gradient
