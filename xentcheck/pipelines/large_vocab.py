"""The large-vocabulary formulations of the softmax loss: ``accurate``, ``online``, ``chunked``.

``accurate``
    The log1p form of log-sum-exp (P. Blanchard, D. J. Higham and N. J. Higham, "Accurately
    computing the log-sum-exp and softmax functions", IMA J. Numer. Anal. 41(4), 2021,
    Algorithm 4.1; scipy's ``logsumexp`` since 1.15)::

        m = max x (first index k);  z = x - m;  s = sum_{i != k} exp(z_i)
        log_softmax = z - log1p(s)

    The largest term, exactly 1, is left out of the sum and added back by ``log1p``, so a
    loss near 0 keeps its relative accuracy: ``[0, -40]``, label 0, is ``log1p(e^-40)`` =
    4.25e-18 where ``stable``'s ``log(1 + e^-40)`` rounds to ``log(1) = 0``. Written as eager
    PyTorch ops in D, like ``stable`` (each step rounded to D, the sum accumulated per the
    precision); its backward is autograd of those ops (:func:`accurate_backward`).

``online``
    Liger-Kernel's cross-entropy (``ops/cross_entropy.py`` as of August 2026, which writes
    the exponentials as ``tl.exp2((x - m) * LOG2_E)`` itself): one pass over the row in blocks
    of ``min(32768, next_power_of_2(C))`` classes keeping a running max ``m`` and a running
    sum ``d`` rescaled whenever the max grows (M. Milakov and N. Gimelshein, "Online
    normalizer calculation for softmax", arXiv:1805.02867, 2018, Algorithm 3)::

        m' = max(m, max(block));  d = d * exp(m - m') + sum(exp(block - m'));  m = m'
        lse = m + log(d);  loss = lse - x_t

    in float32 registers from D storage. ``exp2`` of a float32 product (``ex2.approx.f32``
    on NVIDIA GPUs, as Triton's own ``tl.exp`` lowers to): the product's rounding is modelled
    (:func:`kernel_exp`; ``exp2`` itself is taken as correctly rounded, where the hardware's
    approximation is within about 2 float32 ulps), so a term ``e^-30`` carries a relative
    error of up to ``30 log2(e) 2^-24``. The gradient is the kernel's own, formed in the same
    pass (:meth:`SoftmaxOnline.backward`).

``chunked``
    Cut Cross-Entropy's shape (``cce_lse_forward.py``): the row split in chunks of
    ``chunk_size`` classes (a scenario key, ``--chunk-size``, default 4096), each chunk's
    log-sum-exp ``mx + log(sum(exp(chunk - mx)))``, merged in order with
    ``logaddexp(a, b) = log1p(exp(min - max)) + max``; the target logit is gathered from its
    chunk and ``loss = lse - x_t``. float32 registers from D storage, numpy's float32 ``exp``
    and ``log`` (the Triton exp2 rounding is modelled for ``online`` only; written with torch
    ops, as ``tests/test_large_vocab.py`` does, the 16-bit losses are the same bits). Its
    gradient is the one-pass kernel's ``p - y`` with ``p = exp(x - lse)`` (CCE's backward
    kernel forms ``exp(logits - lse)`` the same way).

``online`` and ``chunked`` share the ``fused`` kernel's precision model (:mod:`.fused`): the
loss of each row formed in float32 and stored in D once (``chunked`` from ``x - lse``, with
``fused``'s batch reduction; ``online`` as Liger forms it, reduction included). Both add
the max back before subtracting the target's logit (``lse - x_t``) where ``stable``
subtracts ``x_t - m`` first: a loss much smaller than the largest logit loses the float32
digits of ``lse`` that ``m`` takes. A block (or chunk) whose logits are all masked
(``-inf``) adds nothing, as ``torch.logsumexp`` guards it (Liger's loop, met with such a
block before any finite logit, would form ``-inf - -inf`` = NaN; xentcheck treats a mask as
removing the class). Neither keeps the replay contract (their reductions run inside the
kernel step): a row wider than a block runs whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..case import Case
from ..precision import FloatArray, Precision
from ..stages import StageRunner
from .base import Block, Pipeline, Saved, reduce_losses
from .fused import SoftmaxFused, _coefficients
from .textbook import _NLL_STAGES, _softmax_nll

# Liger-Kernel's largest block of classes per loop step (MAX_FUSED_SIZE = 65536 // 2).
LIGER_MAX_BLOCK = 32768
_LOG2_E = math.log2(math.e)


class SoftmaxAccurate(Pipeline):
    name = "accurate"
    default = False
    family = "softmax"
    from_logits = True
    formula = ("z = x - max x; s = sum(exp(z)) less the max's 1; "
               "log_softmax = z - log1p(s); loss = -sum(y * log_softmax)")
    stages = ("cast", "shift", "exp", "sum", "log1p", "log_softmax", *_NLL_STAGES)

    @staticmethod
    def _log_softmax(run: StageRunner, block: Block) -> tuple[FloatArray, ...]:
        """``(x, k, z, e, at_max, s, log_softmax)``, every step as the forward pass takes it."""
        x = run.cast("cast", block.logits)
        top = run.max("shift", x)
        k = run.argmax("shift", x)
        z = run.subtract("shift", x, top)
        e = run.exp("exp", z)
        # the max's term, exactly 1, is left out of the sum (scattered to 0 at its index)
        at_max = run.scatter("exp", x.shape, k, np.ones(len(k))) != 0
        rest = run.select("exp", at_max, 0.0, e)
        s = run.sum("sum", rest, keepdims=True)
        log_softmax = run.subtract("log_softmax", z, run.log1p("log1p", s))
        return x, k, z, e, at_max, s, log_softmax

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        log_softmax = self._log_softmax(run, block)[-1]
        return _softmax_nll(run, block, run.save("log_softmax", log_softmax))

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        return accurate_backward(self, run, block, upstream)


def accurate_backward(pipeline: SoftmaxAccurate, run: StageRunner, block: Block,
                      upstream: float) -> FloatArray:
    """Autograd of ``accurate`` written as PyTorch ops, op for op, each result rounded to D::

        m, k = x.max(-1, keepdim=True); z = x - m
        e = torch.exp(z).scatter(-1, k, 0.0); s = e.sum(-1, keepdim=True)
        log_softmax = z - torch.log1p(s)

    (then the NLL of :func:`~xentcheck.pipelines.textbook._softmax_nll`). ``log1p``'s
    backward is ``grad / (s + 1)``; ``scatter``'s passes the gradient but at ``k``; ``max``'s
    sends ``-sum(grad_z)`` to its index, as for ``shifted``.
    """
    from ..backward import _textbook_nll_backward  # backward imports the pipelines' types

    fwd = run.unwatched(pipeline.all_stages)
    _, k, _, e, at_max, s, _ = pipeline._log_softmax(fwd, block)
    grad_lsm = _textbook_nll_backward(run, block, upstream)
    # log_softmax = z - l: z gets grad_lsm; l (one per row) the row sum of -grad_lsm
    grad_l = run.sum("log_softmax", run.negate("log_softmax", grad_lsm), keepdims=True)
    grad_s = run.divide("log1p", grad_l, fwd.add("log1p", s, 1.0), blame=[grad_l])
    # s = sum(rest): grad_s expanded; rest = e scattered to 0 at k: e gets it elsewhere
    grad_e = run.select("sum", at_max, 0.0, np.broadcast_to(grad_s, e.shape))
    # e = exp(z): grad * result, added to z's gradient from log_softmax
    from_exp = run.multiply("exp", grad_e, e, blame=[grad_e])
    grad_z = run.add("exp", grad_lsm, from_exp, blame=[grad_lsm, from_exp])
    # z = x - m: x gets grad_z; m gets -grad_z summed over the row, at the max's index
    back = run.sum("shift", run.negate("shift", grad_z))
    return run.add("shift", grad_z, run.scatter("shift", grad_z.shape, k, back),
                   blame=[grad_z, back[:, None]])


# -- kernels: float32 registers from D storage -----------------------------------------------


def kernel_exp(v: FloatArray) -> FloatArray:
    """Triton's ``tl.exp`` of float32 values: ``exp2(v * log2(e))``, the product rounded to
    float32 first (``ex2.approx.f32`` takes a float32 argument). Other compute dtypes (float64
    D) take numpy's exp (Triton's float64 exp is libdevice's)."""
    if v.dtype != np.float32:
        return np.exp(v)
    # exp2 of the float32 product, correctly rounded to float32 (numpy's float32 exp2 is
    # not: evaluated in float64, one rounding)
    return np.exp2((v * np.float32(_LOG2_E)).astype(np.float64)).astype(np.float32)


def liger_block_size(classes: int) -> int:
    """Liger's ``BLOCK_SIZE = min(MAX_FUSED_SIZE, triton.next_power_of_2(V))``."""
    return min(LIGER_MAX_BLOCK, 1 << max(0, classes - 1).bit_length())


def online_normalizer(x: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The running max ``m`` and rescaled running sum ``d`` of each row after the last block
    (Liger's first loop), in ``x``'s dtype; a block adds nothing while the max is ``-inf``."""
    rows, classes = x.shape
    step = liger_block_size(classes)
    m = np.full(rows, -np.inf, dtype=x.dtype)
    d = np.zeros(rows, dtype=x.dtype)
    for start in range(0, classes, step):
        chunk = x[:, start:start + step]
        m_new = np.maximum(m, np.max(chunk, axis=-1))
        seen = m_new > -np.inf
        shift = np.where(seen, m_new, 0)  # -inf - -inf would be NaN: nothing to add yet
        terms = np.sum(kernel_exp(chunk - shift[:, None]), axis=-1)
        d = np.where(seen, d * kernel_exp(np.where(seen, m - shift, 0)) + terms, d)
        m = m_new
    return m, d


def chunked_lse(x: FloatArray, chunk_size: int) -> FloatArray:
    """Each row's log-sum-exp as Cut Cross-Entropy forms it: per chunk of ``chunk_size``
    classes ``mx + log(sum(exp(chunk - mx)))``, merged in order by
    ``log1p(exp(min - max)) + max``; a chunk of masked logits only is ``-inf``."""
    lse = np.full(x.shape[0], -np.inf, dtype=x.dtype)
    for start in range(0, x.shape[1], chunk_size):
        chunk = x[:, start:start + chunk_size]
        mx = np.max(chunk, axis=-1)
        finite = mx > -np.inf
        shift = np.where(finite, mx, 0)
        part = np.where(finite, shift + np.log(np.sum(np.exp(chunk - shift[:, None]), axis=-1)),
                        -np.inf)
        high, low = np.maximum(lse, part), np.minimum(lse, part)
        merged = np.log1p(np.exp(low - np.where(high > -np.inf, high, 0))) + high
        lse = np.where(high > -np.inf, merged, -np.inf)
    return lse


class _KernelLogSumExp(SoftmaxFused):
    """A one-pass kernel (``fused``'s precision model) whose log-sum-exp a subclass forms
    (:meth:`_lse`): the log-softmax ``x - lse`` kept in float32."""

    framework = False
    family = "softmax"
    from_logits = True
    stages = ("cast", "logsumexp", "log_softmax", "nll")

    def _lse(self, block: Block) -> Callable[[FloatArray], FloatArray]:
        """Each row's log-sum-exp, in the compute dtype, from the cast logits."""
        raise NotImplementedError

    def _log_softmax(self, run: StageRunner, block: Block, x: FloatArray) -> FloatArray:
        lse = run.fused("logsumexp", self._lse(block), x, round_result=False, reduced_axis=-1)
        return run.fused("log_softmax", np.subtract, x, lse[:, None], round_result=False)


class SoftmaxOnline(_KernelLogSumExp):
    """Liger-Kernel's ``liger_cross_entropy_kernel`` (2026-08): see the module's docstring.

    Integer labels follow the kernel: ``loss = lse - x_y``, times ``w_y``; label smoothing
    ``e`` as ``loss (1 - e) + (sum_blocks sum(-eps x [w]) + e lse)`` (with weights
    ``eps lse W``, W the weights' sum), ``eps = e / C`` formed in float32; ``mean`` divides
    each row's loss by N (or the targets' weight sum) in the kernel, then stores it in D,
    and ``torch.sum`` of that D tensor is the loss. Liger takes no dense labels: those get
    ``-sum_c a_c (x_c - lse)`` as ``fused`` forms it.
    """

    name = "online"
    formula = ("float32, blocks of min(32768, C): m' = max(m, max block); "
               "d = d exp(m - m') + sum(exp(block - m')); loss = (m + log d) - x_t  (Liger)")

    def _lse(self, block: Block) -> Callable[[FloatArray], FloatArray]:
        return _online_lse

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        case = block.case
        if case.label_kind != "index":
            return super().per_example(run, block)
        x = run.cast("cast", block.logits)
        lse = run.fused("logsumexp", self._lse(block), x, round_result=False, reduced_axis=-1)
        constants = _LigerConstants.of(run, block)
        target = block.target

        def loss(v: FloatArray, total: FloatArray) -> FloatArray:
            out = total - np.take_along_axis(v, target[:, None], axis=-1)[:, 0]
            if constants.weights is not None:
                out = constants.weights[target] * out
            if constants.smoothing:
                terms = -constants.eps * v
                if constants.weights is not None:
                    terms = terms * constants.weights
                scaled = _block_sums(terms, liger_block_size(v.shape[-1]))
                smooth = (scaled + constants.eps * total * constants.weight_sum
                          if constants.weights is not None
                          else scaled + constants.smoothing * total)
                out = out * constants.kept + smooth
            return out

        return self._output(run, block, run.fused("nll", loss, x, lse, round_result=False,
                                                  reduced_axis=-1))

    def reduce(self, run: StageRunner, per_example: FloatArray, reduction: str,
               denominator: float, case: Case | None = None) -> FloatArray:
        """Each row's float32 loss (divided by the denominator in float32 for ``mean``)
        stored in D, as ``loss_1d`` holds it; then ``torch.sum`` of those: accumulated per
        the precision and rounded to D."""
        if reduction == "none":
            return per_example
        losses = np.asarray(per_example).astype(run.precision.compute_dtype, copy=False)
        if reduction == "mean":
            with np.errstate(all="ignore"):
                losses = losses / np.asarray(denominator, dtype=run.precision.compute_dtype)
        return reduce_losses(run, run.precision.round(losses), "sum", denominator)

    def reduction_gradient(self, precision: Precision, reduction: str,
                           denominator: float) -> float:
        """``1 / denominator`` in float32, the denominator as the kernel receives it (an
        integer count, or the weights' sum as a float32); Liger divides each entry by the
        denominator, which :meth:`backward` models as this product (one float32 rounding
        apart at most)."""
        if reduction != "mean":
            return 1.0
        if denominator == 0:
            return 0.0
        compute = precision.compute_dtype
        with np.errstate(all="ignore"):
            return float(np.asarray(1.0, dtype=compute) / np.asarray(denominator, dtype=compute))

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        """Liger's in-kernel gradient, every entry formed in float32 and stored in D once:
        ``(p - eps) s`` and at the target ``(p - eps - (1 - e)) s`` (``p`` =
        ``exp2((x - m) log2 e) / d``, ``s`` the upstream scale); with class weights
        ``((1 - e) p w_y + eps (p W - w_c)) s``, at the target ``((1 - e) p_y - (1 - e)) w_y``
        in place of the first term. An ignored row's gradient is +0 (Liger stores 0.0).
        Dense labels (not in Liger): ``(A p - a) s`` with ``A = sum_c a_c``."""
        quiet = StageRunner(run.precision, self.all_stages).bind(run.valid_rows,
                                                                 run.row_offset)
        x = quiet.cast("cast", block.logits)
        compute = run.precision.compute_dtype
        scale = np.asarray(upstream, dtype=compute)
        keep = block.valid[:, None]
        zero = np.zeros((), compute)
        rows = np.arange(len(x))

        def softmax(v: FloatArray) -> FloatArray:
            m, d = online_normalizer(v)
            return kernel_exp(v - np.where(m > -np.inf, m, 0)[:, None]) / d[:, None]

        if block.case.label_kind != "index":
            a = _coefficients(run.precision, block)
            total = np.sum(a.astype(np.float64), axis=-1).astype(compute)[:, None]

            def dense(v: FloatArray) -> FloatArray:
                return np.where(keep, (softmax(v) * total - a) * scale, zero)

            return run.fused("log_softmax", dense, x, blame=[])
        c = _LigerConstants.of(run, block)
        target = block.target

        def kernel(v: FloatArray) -> FloatArray:
            p = softmax(v)
            p_y = p[rows, target]
            if c.weights is None:
                out = (p + -c.eps) * scale
                at_target = ((p_y + -c.eps) + -c.kept) * scale
            else:
                w_y = c.weights[target]
                out = (c.kept * p * w_y[:, None] * scale
                       + c.eps * (-c.weights + p * c.weight_sum) * scale)
                at_target = (((c.kept * p_y - c.kept) * w_y) * scale
                             + (c.eps * (-w_y + p_y * c.weight_sum)) * scale)
            out[rows, target] = at_target
            return np.where(keep, out, zero)

        return run.fused("log_softmax", kernel, x, blame=[])


class _LigerConstants:
    """The constants of Liger's kernel for a block, in float32 (the compute dtype): ``eps``
    = e / C divided in the kernel, ``1 - e``, e, the class weights as stored and their
    sum (``weight.sum().item()``)."""

    def __init__(self, compute: np.dtype[Any], classes: int, smoothing: float,
                 weights: FloatArray | None) -> None:
        self.smoothing = np.asarray(smoothing, dtype=compute)
        self.eps = self.smoothing / np.asarray(classes, dtype=compute)
        self.kept = np.asarray(1.0 - smoothing, dtype=compute)
        self.weights = weights
        self.weight_sum = (None if weights is None
                           else np.asarray(np.sum(weights, dtype=np.float64), dtype=compute))

    @classmethod
    def of(cls, run: StageRunner, block: Block) -> _LigerConstants:
        spec = block.case.spec
        compute = run.precision.compute_dtype
        weights = (None if spec.class_weights is None else run.precision.round(
            np.asarray(spec.class_weights, dtype=np.float64)).astype(compute))
        return cls(compute, block.case.classes, float(spec.label_smoothing), weights)


def _block_sums(values: FloatArray, step: int) -> FloatArray:
    """``scaled_x_sum``: each block's sum added to a float32 running sum, block by block."""
    total = np.zeros(values.shape[0], dtype=values.dtype)
    for start in range(0, values.shape[1], step):
        total = total + np.sum(values[:, start:start + step], axis=-1)
    return total


def _online_lse(v: FloatArray) -> FloatArray:
    """``m + log(d)``: ``-inf`` for a row of masked logits only (d = 0)."""
    m, d = online_normalizer(v)
    return m + np.log(d)


class SoftmaxChunked(_KernelLogSumExp):
    name = "chunked"
    formula = ("float32, chunks of chunk_size classes: lse_k = max + log(sum(exp(chunk - max))); "
               "lse = logaddexp over k; loss = lse - x_t  (Cut Cross-Entropy)")

    def _lse(self, block: Block) -> Callable[[FloatArray], FloatArray]:
        size = block.case.spec.chunk_size
        return lambda v: chunked_lse(v, size)
