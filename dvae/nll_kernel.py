"""The logit-Laplace NLL as one fused elementwise kernel with its analytic gradient.

Autograd through the plain formula makes about 25 passes over the image (forward and backward). Here
the forward is one pass that also writes the factors of the gradient, and the backward multiplies them
by the incoming gradient (or, in the compiled kernel, passes them on where that gradient is 1):

    y = (1 - 2 eps) x + eps,  d = logit(y) - mu,  nll = |d| / b + ln b + ln 2 + ln y + ln(1 - y)
    dnll/dmu   = -sign(d) / b
    dnll/dln b = 1 - |d| / b
    dnll/dx    = (1 - 2 eps) (sign(d) / b + 1 - 2 y) / (y (1 - y))

With `reduction="mean"` the mean is taken inside the same pass and folded into the factors; in the compiled
kernel neither the elementwise nll nor the broadcast gradient of the mean is written out (the eager one
builds the elementwise nll and takes its mean).

On the CPU the two logarithms and the exponential per element are most of the work, and torch's
vectorised ones are slower than float32 needs: for float32 CPU inputs of at least `COMPILED_MIN_ELEMENTS`
the kernel is compiled with `torch.compile` and uses `log32` and `exp32`. Everything else (float64, small
or broadcast inputs, CUDA, no C++ compiler) runs the same kernel in eager torch ops with `torch.log` and
`torch.exp`.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch._dynamo.exc import FailOnRecompileLimitHit
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

LN2 = math.log(2.0)
KERNELS = ("auto", "compiled", "eager")
REDUCTIONS = ("none", "mean")
# Below this many elements the compiled kernel's call overhead outweighs what it saves, and runs with
# small batches (the tests) never pay the one-off compilation.
COMPILED_MIN_ELEMENTS = 2**18
# float32 sqrt(0.5) as bits: `log32` splits v = 2**e * m with m in [sqrt(0.5), sqrt(2)).
_SQRT_HALF_BITS = 0x3F3504F3
_FLOAT32_TINY = torch.finfo(torch.float32).tiny
# ln 2 = _LN2_HIGH + _LN2_LOW, the first with 16 significant bits: n * _LN2_HIGH is exact for |n| < 2**8.
_LN2_HIGH = 0.693145751953125
_LN2_LOW = LN2 - _LN2_HIGH
# Fused multiply-adds in the compiled polynomial: faster, and each rounds once instead of twice.
_COMPILE_OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast"}
_compiled_kernel = None
_compile_failed = False
_recompile_limit_warned = False


def log32(v: Tensor) -> Tensor:
    """ln v for positive normal float32 v (no zeros, infinities, NaNs or subnormals), within 2 ulp.

    v = 2**e * m with m in [sqrt(1/2), sqrt(2)) read from the bits, then ln m = 2 atanh(s) with
    s = (m - 1) / (m + 1), |s| < 0.1716, summed to the s**9 term: the rest is below 2**-28 of the sum.
    """
    bits = v.view(torch.int32)
    e = (bits - _SQRT_HALF_BITS) >> 23
    m = (bits - (e << 23)).view(torch.float32)
    s = (m - 1) / (m + 1)
    s2 = s * s
    series = torch.full_like(s2, 1 / 9)
    for k in (7, 5, 3, 1):
        series = series * s2 + 1 / k
    return 2 * s * series + e.to(torch.float32) * LN2


def exp32(v: Tensor) -> Tensor:
    """e**v for float32 v, within 2 ulp; v is clamped to [-87.3, 88.7], where e**v is a normal float32.

    v = n ln 2 + f with n an integer and |f| <= ln(2) / 2 (ln 2 in two parts, so that f is exact), then
    e**v = 2**n e**f with e**f summed to the f**7 term (the rest is below 2**-28 of the sum).
    A NaN gives an unspecified number, not NaN: the nll adds ln b itself, so the loss is still NaN.
    """
    v = v.clamp(-87.3, 88.7)
    n = torch.round(v * (1 / LN2))
    f = v - n * _LN2_HIGH - n * _LN2_LOW
    series = torch.full_like(f, 1 / 5040)
    for k in (720, 120, 24, 6, 2, 1, 1):
        series = series * f + 1 / k
    return (series.view(torch.int32) + (n.to(torch.int32) << 23)).view(torch.float32)


def _terms(x: Tensor, mu: Tensor, log_scale: Tensor, eps: float, mean: bool, need_x: bool,
           need_mu: bool, need_scale: bool, log=torch.log, exp=torch.exp) -> tuple[Tensor | None, ...]:
    """The nll (elementwise, or its mean) and the factors that turn the incoming gradient into each
    input's gradient (None for an input that needs none)."""
    y = x * (1 - 2 * eps) + eps
    log_y, log_1my = log(y), log(1 - y)
    d = log_y - log_1my - mu
    inv_b = exp(-log_scale)
    t = d.abs() * inv_b
    nll = t + log_scale + LN2 + log_y + log_1my
    weight = 1 / nll.numel() if mean else 1.0
    slope = torch.sign(d) * inv_b
    grad_x = (weight * (1 - 2 * eps)) * (slope + 1 - 2 * y) / (y * (1 - y)) if need_x else None
    grad_mu = -weight * slope if need_mu else None
    grad_scale = weight * (1 - t) if need_scale else None
    return nll.mean() if mean else nll, grad_x, grad_mu, grad_scale


def _fast_terms(x, mu, log_scale, eps, mean, need_x, need_mu, need_scale):
    return _terms(x, mu, log_scale, eps, mean, need_x, need_mu, need_scale, log=log32, exp=exp32)


def uses_compiled_kernel(x: Tensor, mu: Tensor, log_scale: Tensor, eps: float,
                         min_elements: int = COMPILED_MIN_ELEMENTS) -> bool:
    """Whether the compiled float32 kernel applies: float32 CPU tensors, mu of x's shape, ln b of x's
    shape or a scalar, at least `min_elements` elements, eps > 0 (so that y is a normal number), and
    neither inside a compiled region (which fuses the eager kernel itself) nor under a dispatch mode."""
    return (
        not _compile_failed
        and x.numel() >= min_elements
        and eps >= _FLOAT32_TINY
        and mu.shape == x.shape
        and (log_scale.shape == x.shape or log_scale.dim() == 0)
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (x, mu, log_scale))
        and not torch.compiler.is_compiling()
        and not is_in_torch_dispatch_mode()  # FlopCounterMode and the like: torch.compile refuses them
    )


def _compiled_terms(x: Tensor, mu: Tensor, log_scale: Tensor, *args) -> list[Tensor | None] | None:
    """`_fast_terms` compiled over flat tensors; None where it cannot be: with a warning the first time,
    for good where compiling is impossible (no C++ compiler, say), for this call where torch._dynamo
    already holds its limit of kernels (`recompile_limit`: each eps, reduction and set of gradients
    is a kernel of its own)."""
    global _compiled_kernel, _compile_failed, _recompile_limit_warned
    flat = [t.reshape(-1) if t.dim() else t for t in (x, mu, log_scale)]
    try:
        if _compiled_kernel is None:  # inside the try: an older torch may not know an option
            # dynamic=None: a kernel specialised to the first element count (faster than one for any count);
            # another count compiles a second kernel
            _compiled_kernel = torch.compile(_fast_terms, dynamic=None, fullgraph=True, options=_COMPILE_OPTIONS)
        nll, *factors = _compiled_kernel(*flat, *args)
    except FailOnRecompileLimitHit:
        if not _recompile_limit_warned:
            _recompile_limit_warned = True
            warnings.warn("the compiled logit-Laplace kernel has reached torch._dynamo's recompile_limit in this "
                          "process; new combinations of eps, reduction and gradients run the eager kernel.",
                          RuntimeWarning, stacklevel=4)
        return None
    except Exception as error:
        _compile_failed = True
        warnings.warn(f"the compiled logit-Laplace kernel is unavailable ({type(error).__name__}: {error}); "
                      "using the eager kernel.", RuntimeWarning, stacklevel=4)
        return None
    return [nll.view(x.shape) if nll.dim() else nll] + [f if f is None else f.view(x.shape) for f in factors]


class LogitLaplaceNLL(torch.autograd.Function):
    """The logit-Laplace NLL (elementwise or its mean) with its analytic gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, mu: Tensor, log_scale: Tensor, eps: float, mean: bool, compiled: bool):
        args = (x, mu, log_scale, eps, mean, *ctx.needs_input_grad[:3])
        terms = _compiled_terms(*args) if compiled else None
        nll, *factors = terms if terms is not None else _terms(*args)
        ctx.shapes = (x.shape, mu.shape, log_scale.shape)
        ctx.compiled = terms is not None
        ctx.save_for_backward(*(f for f in factors if f is not None))
        return nll

    @staticmethod
    def backward(ctx, grad: Tensor):
        factors = iter(ctx.saved_tensors)
        # The mean's incoming gradient is usually exactly 1 (loss.backward()): the factors are then the
        # gradients, and a pass over each is saved. Autograd copies them before anyone may write to
        # them while the graph is retained (AccumulateGrad and InputBuffer check the reference count).
        one = ctx.compiled and grad.dim() == 0 and grad.item() == 1.0
        grads = [(next(factors) if one else grad * next(factors)).sum_to_size(shape) if needed else None
                 for shape, needed in zip(ctx.shapes, ctx.needs_input_grad)]
        return *grads, None, None, None


def fused_logit_laplace_nll(x: Tensor, mu: Tensor, log_scale: Tensor, eps: float, reduction: str = "none",
                            kernel: str = "auto") -> Tensor:
    """`logit_laplace_nll`'s computation: elementwise (`reduction="none"`) or its mean ("mean").

    `kernel`: "auto" (compiled for large float32 CPU inputs), "compiled" (wherever the compiled kernel
    applies, whatever the size) or "eager".
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not known; use one of {', '.join(REDUCTIONS)}.")
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not known; use one of {', '.join(KERNELS)}.")
    min_elements = 0 if kernel == "compiled" else COMPILED_MIN_ELEMENTS
    compiled = kernel != "eager" and uses_compiled_kernel(x, mu, log_scale, eps, min_elements)
    return LogitLaplaceNLL.apply(x, mu, log_scale, eps, reduction == "mean", compiled)
