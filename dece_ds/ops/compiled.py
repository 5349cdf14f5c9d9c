"""The chunk stages as fused kernels (``backend="compile"``): ``torch.compile`` turns each into one loop over
the chunk (generated C++ on CPU, Triton on GPU), so a chunk is read three times in its own dtype and the
gradient written once, with no ``[c, V]`` fp32 scratch between the passes of the eager stages.

    lse_kernel     z [c, V] -> row max m [c], sum exp(z - m) [c]                        (read 1)
    sums_kernel    z, shift, log_norm -> sum_k log q_k [c], sum_k r_k m_k [c]           (read 2)
    grad_kernel    z, shift, log_norm, row coefficients -> dloss/dz [c, V] in out dtype  (read 3, write 1)

The formula is ``shard_math``'s, written as expressions (p, q, r recomputed from z per kernel rather than
kept); the per-row target-column correction is ``shard_math.finish_terms`` itself. Scalars go in as 0-dim
tensors so a new alpha (every epoch) reuses the compiled code; sizes are dynamic. ``supported`` says where
the eager stages run instead: q = alpha * p exactly (no floor and no smoothing offset, e.g. alpha = 1), whose
``log q`` the eager path forms without an exp -> log round trip.
"""

from __future__ import annotations

import functools
import types

import torch

from .shard_math import DeceConstants, compute_dtype

BACKENDS = ("eager", "compile")


def supported(k: DeceConstants) -> bool:
    """Whether the compiled kernels cover these constants (else the eager stages run)."""
    return k.backend == "compile" and not k.ratio_is_constant


def _logits(z: torch.Tensor, cap: torch.Tensor | None) -> torch.Tensor:
    zf = z.to(compute_dtype(z.dtype))
    return zf if cap is None else cap * torch.tanh(zf / cap)


def _probs(z, shift, log_norm, f, alpha, off, cap):
    """p, pf = max(p, f), q = alpha pf + off, r m = [p >= f] pf / q, all ``[c, V]`` (fused away)."""
    zc = _logits(z, cap)
    p = torch.exp((zc - shift[:, None]) - log_norm[:, None])
    pf = torch.clamp_min(p, f)
    q = alpha * pf + off
    return zc, p, q, torch.where(p >= f, pf / q, torch.zeros_like(p))


def _lse(z: torch.Tensor, cap: torch.Tensor | None):
    zc = _logits(z, cap)
    m = zc.amax(dim=-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m, torch.exp(zc - m[:, None]).sum(-1)


def _sums(z, shift, log_norm, f, alpha, off, cap):
    _, _, q, rm = _probs(z, shift, log_norm, f, alpha, off, cap)
    return torch.log(q).sum(-1), rm.sum(-1)


def _grad(z, shift, log_norm, target_local, coef_p, coef_r, coef_t, f, alpha, off, cap, out: torch.Tensor):
    zc, p, _, rm = _probs(z, shift, log_norm, f, alpha, off, cap)
    cols = torch.arange(z.shape[1], device=z.device, dtype=torch.int32)   # int32: a third of int64's compare cost
    g = coef_p[:, None] * p + coef_r[:, None] * rm
    g = g + torch.where(cols[None, :] == target_local[:, None], coef_t[:, None], torch.zeros_like(g))
    if cap is not None:
        g = g * (1.0 - (zc / cap) * (zc / cap))
    out.copy_(g)   # written straight into out by the kernel, rounded once to its dtype


@functools.lru_cache(maxsize=None)
def _compiled(name: str, variant: tuple):
    """One compiled function per kernel and variant (input dtype, output dtype, soft-cap on/off), each on a
    code object of its own: Dynamo keeps compiled graphs, and its limit of 8 recompiles, per code object, so
    variants used side by side (a bf16 model evaluated in fp32, tests) do not use up one shared budget. Sizes
    are dynamic (a chunk of one row adds one specialization). The rows are not marked unbacked: that saves the
    size-1 graph but made the kernels 25-35 % slower (bf16, N 4096, V 32000, one CPU thread)."""
    fn = {"lse": _lse, "sums": _sums, "grad": _grad}[name]
    tag = "_".join(str(v).replace("torch.", "") for v in variant)
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    fresh = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return torch.compile(fresh, dynamic=True, fullgraph=True)


def _scalar(x: float, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype, device=device)


def _cap(k: DeceConstants, dtype: torch.dtype, device) -> torch.Tensor | None:
    return None if k.logit_softcap is None else _scalar(k.logit_softcap, dtype, device)


def _scalars(k: DeceConstants, like: torch.Tensor):
    """floor, alpha, off-target offset and cap (or None) as 0-dim tensors of ``like``'s dtype and device."""
    return (*(_scalar(x, like.dtype, like.device) for x in (k.prob_floor, k.alpha, k.off_target_offset)),
            _cap(k, like.dtype, like.device))


def lse_kernel(z: torch.Tensor, k: DeceConstants) -> tuple[torch.Tensor, torch.Tensor]:
    """``[c, V_shard]`` logits (any float dtype) -> row max ``m`` and ``sum exp(z - m)`` ``[c]`` (compute dtype)."""
    cap = _cap(k, compute_dtype(z.dtype), z.device)
    return _compiled("lse", (z.dtype, cap is not None))(z, cap)


def sums_kernel(z, shift, log_norm, k: DeceConstants) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ``sum_k log q_k`` and ``sum_k r_k m_k`` over the chunk's columns ``[c]``, every token counted as
    off-target (``shard_math.finish_terms`` corrects the target column)."""
    f, alpha, off, cap = _scalars(k, shift)
    return _compiled("sums", (z.dtype, cap is not None))(z, shift, log_norm, f, alpha, off, cap)


def grad_kernel(z, shift, log_norm, target_local, coef_p, coef_r, coef_t, k: DeceConstants,
                out: torch.Tensor) -> torch.Tensor:
    """``coef_p p + coef_r r m + [k = t] coef_t`` (times the soft-cap's ``1 - tanh^2``) written into ``out``
    ``[c, V_shard]`` (any float dtype), rounded once -> ``out``. ``target_local`` outside ``[0, V_shard)`` adds
    no target term."""
    f, alpha, off, cap = _scalars(k, shift)
    target_local = target_local.to(torch.int32)   # vocabulary shards are far below 2**31 columns
    _compiled("grad", (z.dtype, out.dtype, cap is not None))(z, shift, log_norm, target_local, coef_p, coef_r,
                                                              coef_t, f, alpha, off, cap, out)
    return out
