"""The discrete bottleneck: Gumbel-softmax relaxation, KL to the uniform prior, argmax tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GumbelCodebook(nn.Module):
    """Turns encoder logits [B, K, h, w] into a relaxed one-hot over the K codes.

    Training samples z = softmax((logits + Gumbel noise) / tau); with `hard=True` the forward
    value is the one-hot of the sample and the gradient is the relaxed one's (straight-through).
    Without gradients (evaluation) it returns the one-hot of argmax(logits): no noise.

    `fused=True` (the default) lets `project` and `kl_to_uniform` keep only the logits for the
    backward pass instead of the relaxed one-hot, log q and q: three [B, K, h, w] tensors become one.
    `fused=False` is the straightforward autograd version, kept to measure and test against.
    A fused pass keeps its sample too when it is at most `keep_sample_bytes` (the tiny model's 4 MB):
    drawing the noise again in backward costs more time than so small a tensor costs memory.
    """

    def __init__(self, K: int, hard: bool = False, fused: bool = True, keep_sample_bytes: int = 16 * 2**20):
        super().__init__()
        self.K = K
        self.hard = hard
        self.fused = fused
        self.keep_sample_bytes = keep_sample_bytes

    def forward(self, logits: Tensor, tau: float) -> Tensor:
        if not tau > 0:  # NaN too
            raise ValueError(f"the Gumbel-softmax temperature must be > 0, got tau={tau}.")
        if not self.training:
            return F.one_hot(logits.argmax(dim=1), self.K).permute(0, 3, 1, 2).to(logits.dtype)
        return gumbel_softmax(logits, tau, self.hard)

    @staticmethod
    def tokens(logits: Tensor) -> Tensor:
        """argmax over the K codes: [B, K, h, w] -> [B, h, w] (int64)."""
        return logits.argmax(dim=1)

    def project(self, logits: Tensor, tau: float, conv: nn.Conv2d) -> Tensor:
        """`conv` (the decoder's 1x1 K -> D input convolution) applied to a training sample: what
        `conv(self(logits, tau))` computes, without keeping the relaxed one-hot for backward when fused."""
        if not tau > 0:  # NaN too
            raise ValueError(f"the Gumbel-softmax temperature must be > 0, got tau={tau}.")
        if not (self.fused and self.training and logits.device.type in ("cpu", "cuda")):
            return conv(self(logits, tau))
        return GumbelSoftmaxProjection.apply(logits, conv.weight, conv.bias, tau, self.hard, self.keep_sample_bytes)

    def kl_to_uniform(self, logits: Tensor) -> Tensor:
        """KL(q || uniform(K)) per latent position, [B, h, w]: sum_k q log q + log K (in float32 at least)."""
        if self.fused:
            return KLToUniform.apply(logits)
        log_q = F.log_softmax(_at_least_float32(logits), dim=1)
        return (log_q.exp() * log_q).sum(dim=1) + math.log(self.K)


def gumbel_softmax(logits: Tensor, tau: float, hard: bool = False) -> Tensor:
    """softmax((logits + g) / tau) over dim 1 with g ~ Gumbel(0, 1); straight-through when hard.

    The noise is -log(-log(u)) with uniform u: on the CPU this is about 3x faster than the
    exponential sampler behind `F.gumbel_softmax`, and it was 14% of a tiny-model training step.
    """
    soft = _relaxed_sample(logits, tau)
    if not hard:
        return soft
    index = soft.argmax(dim=1, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(1, index, 1.0)
    return one_hot - soft.detach() + soft


def _relaxed_sample(logits: Tensor, tau: float, rng_state: Tensor | None = None) -> Tensor:
    """softmax((logits + g) / tau) with Gumbel noise g drawn from the global generator, or from
    `rng_state` (a state of logits' device's generator) without touching the global one."""
    # torch.rand (not rand_like): the same noise whatever the memory layout of the logits (channels_last)
    shape = dict(size=logits.shape, dtype=logits.dtype, device=logits.device)
    if rng_state is None:
        u = torch.rand(**shape)
    else:
        cuda = logits.device.type == "cuda"
        with torch.random.fork_rng(devices=[logits.device] if cuda else [], device_type="cuda"):
            if cuda:
                torch.cuda.set_rng_state(rng_state, logits.device)
            else:
                torch.set_rng_state(rng_state)
            u = torch.rand(**shape)
    # u -> -g -> logits + g -> (logits + g) / tau in place: one [B, K, h, w] buffer besides the logits
    u.clamp_(torch.finfo(logits.dtype).tiny, 1.0).log_().neg_().log_().neg_().add_(logits).div_(tau)
    return u.softmax(dim=1)


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


class GumbelSoftmaxProjection(torch.autograd.Function):
    """conv1x1(gumbel_softmax(logits, tau, hard), weight, bias), saving the logits and the state of
    the random generator instead of the [B, K, h, w] sample: backward draws the same noise again
    (unless the sample is at most `keep_sample_bytes`: then it is saved as well, and backward reads it).

    With z = softmax((logits + g) / tau), s = W^T grad_out (per position):
    grad_logits = z * (s - sum_k z_k s_k) / tau, grad_W = sum over positions of grad_out x input,
    where input is z, or its one-hot when hard (straight-through: the gradient still goes through z).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, weight: Tensor, bias: Tensor | None, tau: float, hard: bool,
                keep_sample_bytes: int = 0) -> Tensor:
        rng_state = _rng_state(logits.device)
        soft = _relaxed_sample(logits, tau)
        keep_sample = soft.nbytes <= keep_sample_bytes  # in its own dtype (autocast's)
        ctx.rng_state = None if keep_sample else rng_state
        ctx.tau, ctx.hard = tau, hard
        ctx.save_for_backward(logits, weight, *([soft] if keep_sample else []))
        if hard:
            codes = weight[:, :, 0, 0].t()  # (K, D)
            out = F.embedding(soft.argmax(dim=1), codes).permute(0, 3, 1, 2)  # (B, D, h, w)
            return out + bias[:, None, None] if bias is not None else out.contiguous()
        return F.conv2d(soft, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, weight, *kept = ctx.saved_tensors
        need_logits, need_weight, need_bias = ctx.needs_input_grad[:3]
        soft = kept[0] if kept else _relaxed_sample(logits, ctx.tau, ctx.rng_state)
        dtype = grad_out.dtype  # under autocast the forward convolution ran in this precision
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, soft.to(dtype), weight.to(dtype), [weight.shape[0]], [1, 1], [0, 0], [1, 1], False,
            [0, 0], 1, [need_logits, need_weight and not ctx.hard, need_bias])
        if need_weight and ctx.hard:  # the convolution read one-hot codes: sum grad_out per chosen code
            chosen = soft.argmax(dim=1).flatten()
            flat = grad_out.transpose(0, 1).reshape(grad_out.shape[1], -1)  # (D, B*h*w)
            grad_weight = weight.new_zeros(weight.shape[:2], dtype=dtype).index_add_(1, chosen, flat)[:, :, None, None]
        grad_logits = None
        if need_logits:  # softmax's backward, then the division by tau
            grad_input = grad_input.to(soft.dtype)
            grad_input.sub_((soft * grad_input).sum(dim=1, keepdim=True))
            grad_logits = grad_input.mul_(soft).div_(ctx.tau).to(logits.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_logits, grad_weight, grad_bias, None, None, None


def _at_least_float32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class KLToUniform(torch.autograd.Function):
    """sum_k q log q + log K per position with q = softmax(logits) (float32 at least), keeping only the logits:
    the gradient q_k (log q_k - sum_j q_j log q_j) is computed from them again."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        ctx.save_for_backward(logits)
        log_q = F.log_softmax(_at_least_float32(logits), dim=1)
        return (log_q.exp() * log_q).sum(dim=1) + math.log(logits.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (logits,) = ctx.saved_tensors
        log_q = F.log_softmax(_at_least_float32(logits), dim=1)
        q = log_q.exp()
        log_q.sub_((q * log_q).sum(dim=1, keepdim=True)).mul_(q).mul_(grad[:, None])
        return log_q.to(logits.dtype)


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of a code-usage histogram: K when every code is used equally, 1 for one code."""
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum()
    return entropy.exp().float()
