"""Argument checks shared by every loss entry point (``dece_loss``, ``vocab_parallel_dece``,
``fused_linear_dece``): one function per kind of argument, so all paths accept and refuse the same
inputs with the same messages. Each message names the argument and says what was expected.

    check_float_tensor   logits / hidden / weight / bias: a floating-point tensor of a supported dtype
    check_target         target: int64 or int32 ids (float and bool refused), shape and device of the input
    check_loss_args      alpha, label_smoothing, reduction, prob_floor, num_items_in_batch, chunk_size
    check_logit_options  z_loss, logit_softcap, chunk_budget_bytes
"""

from __future__ import annotations

import math
import numbers

import torch

from .compiled import BACKENDS

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TARGET_DTYPES = (torch.int64, torch.int32)


def check_float_tensor(t, name: str) -> None:
    """``t`` is a tensor of one of ``FLOAT_DTYPES`` (fp64 for gradcheck)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (fp32, bf16, fp16, fp64)")


def check_target(target, lead_shape: tuple, device: torch.device, lead_name: str) -> None:
    """``target`` ``[...]``: int64 (or int32) token ids with ``lead_name``'s leading shape, on its device.

    Float and bool targets are refused rather than truncated (a float 2.7 would silently become id 2).
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected an int64 tensor of token ids, got {type(target).__name__}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target: expected an int64 (or int32) tensor of token ids, got {target.dtype}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(f"target: shape {tuple(target.shape)} must equal {lead_name}.shape[:-1] = "
                         f"{tuple(lead_shape)} ({lead_name} is [..., {'H' if lead_name == 'hidden' else 'V'}], "
                         f"target [...])")
    if target.device != device:
        raise ValueError(f"target: on {target.device}, {lead_name} on {device}")


def check_num_items(num_items_in_batch, reduction: str) -> None:
    """``None``, or a positive finite count (int, float or a one-element tensor) with mean/sum."""
    if num_items_in_batch is None:
        return
    value = num_items_in_batch
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"num_items_in_batch: expected a number or a one-element real tensor, got a "
                            f"{value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"num_items_in_batch: expected a positive number (the token count), got "
                        f"{type(num_items_in_batch).__name__} {num_items_in_batch!r}")
    if reduction == "none":
        raise ValueError("num_items_in_batch: divides the summed loss, so it needs reduction='mean' or 'sum', "
                         "got reduction='none'")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"num_items_in_batch: expected a positive finite count, got {value}")


def check_chunk_size(chunk_size) -> None:
    """``None`` (automatic) or a positive int."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size: expected a positive int (tokens per chunk) or None, got "
                        f"{type(chunk_size).__name__} {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int (tokens per chunk) or None, got {chunk_size}")


def check_loss_args(alpha, label_smoothing, reduction, prob_floor, num_items_in_batch, chunk_size=None) -> None:
    """The scalar arguments every loss path shares; errors name the argument and the bad value."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    for name, value in (("alpha", alpha), ("label_smoothing", label_smoothing), ("prob_floor", prob_floor)):
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected 0 < alpha <= 1, got {alpha}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing: expected 0 <= label_smoothing < 1, got {label_smoothing}")
    if not 0.0 <= float(prob_floor) < 1.0:
        raise ValueError(f"prob_floor: expected 0 <= prob_floor < 1, got {prob_floor}")
    check_num_items(num_items_in_batch, reduction)
    check_chunk_size(chunk_size)


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    return float(value)


def check_logit_options(z_loss=0.0, logit_softcap=None, chunk_budget_bytes=None, backend="eager") -> None:
    """``z_loss`` a finite float >= 0; ``logit_softcap`` None or a finite float > 0; ``chunk_budget_bytes``
    None or a positive int (bytes of ``[chunk, V]`` scratch); ``backend`` "eager" or "compile"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    z = _real("z_loss", z_loss)
    if not (math.isfinite(z) and z >= 0.0):
        raise ValueError(f"z_loss: expected a finite coefficient >= 0, got {z_loss}")
    if logit_softcap is not None:
        cap = _real("logit_softcap", logit_softcap)
        if not (math.isfinite(cap) and cap > 0.0):
            raise ValueError(f"logit_softcap: expected None or a finite cap > 0, got {logit_softcap}")
    if chunk_budget_bytes is not None:
        if isinstance(chunk_budget_bytes, bool) or not isinstance(chunk_budget_bytes, numbers.Integral):
            raise TypeError(f"chunk_budget_bytes: expected a positive int (bytes) or None, got "
                            f"{type(chunk_budget_bytes).__name__} {chunk_budget_bytes!r}")
        if chunk_budget_bytes < 1:
            raise ValueError(f"chunk_budget_bytes: expected a positive int (bytes) or None, got {chunk_budget_bytes}")
