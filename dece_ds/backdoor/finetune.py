"""Training through the DeepSpeed engine: one process without a launcher, the engine's config, one epoch.

- ``ensure_distributed``: a lone process gets ``RANK=0``, ``WORLD_SIZE=1`` and a free port, then gloo
  (under a launcher the environment is already set and left alone).
- ``ds_config``: AdamW, gradient clipping 1.0, ZeRO stage 0, linear warm-up over ``warmup_frac`` of the
  steps, then linear decay to 0 at the last step (``WarmupDecayLR``) or lr held (``WarmupLR``); with a
  ``dece`` section when the run is DeCE.
- ``make_engine``: ``dece_ds.initialize`` for DeCE (the loss goes into the HF loss hook, alpha from
  ``engine.global_steps``), ``deepspeed.initialize`` otherwise.
- ``baseline_loss_hook``: the ``ls`` / ``gce`` / ``intrust`` baselines as an HF ``model.loss_function``
  (a ``FunctionLossHook``: the same label shift and install/remove as the DeCE hook).
- ``train_epoch``: one pass in a seeded permutation (``[seed, epoch]``), full batches only, each moved to
  the engine's device.
- ``resolve_auto_alpha``: a ``dece`` section with ``alpha_base: "auto"`` -> the number, measured on the model
  before its engine exists (``dece_ds.auto_alpha``), on the first epoch's batches.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from ..audit.recorder import ROW_IDS_KWARG, audit_wants_rows
from ..recipes.runtime import engine_device, to_device
from .encode import IGNORE
from .progress import progress

if TYPE_CHECKING:
    from .experiment import StageSpec

BASELINE_DEFAULTS = {"ls": {"label_smoothing": 0.1}, "gce": {"q": 0.5},
                     "intrust": {"ce_weight": 0.2, "dce_weight": 0.8, "delta": 0.5}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_distributed() -> None:
    """One process without a launcher: RANK=0, WORLD_SIZE=1 and a free port, then gloo."""
    import deepspeed
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def ds_config(stage: StageSpec, total_steps: int, dece: Mapping[str, Any] | None = None) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": stage.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": stage.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": stage.weight_decay, "torch_adam": True}},
        "scheduler": _scheduler(stage, total_steps),
    }
    if dece is not None:
        cfg["dece"] = dict(dece)
    return cfg


def _scheduler(stage: StageSpec, total_steps: int) -> dict:
    params = {"warmup_min_lr": 0.0, "warmup_max_lr": stage.lr, "warmup_type": "linear",
              "warmup_num_steps": max(1, int(stage.warmup_frac * total_steps))}
    if stage.lr_schedule == "constant":
        return {"type": "WarmupLR", "params": params}
    return {"type": "WarmupDecayLR", "params": {**params, "total_num_steps": max(2, total_steps)}}


def make_engine(model, stage: StageSpec, total_steps: int, dece: Mapping[str, Any] | None = None):
    """The DeepSpeed engine; with ``dece`` through ``dece_ds.initialize`` (DeCE in the HF loss hook)."""
    import deepspeed
    ensure_distributed()
    config = ds_config(stage, total_steps, dece)
    if dece is not None:
        from ..integrations.deepspeed import initialize
        engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=config)
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def baseline_loss_hook(kind: str, params: Mapping[str, Any]):
    """An HF ``model.loss_function`` computing a baseline loss on shifted labels; ``.install(model)`` puts it
    in place reversibly, ``.params`` are the resolved settings."""
    from ..integrations.loss_hook import FunctionLossHook
    from ..ops import baseline_losses as bl
    fn = {"ls": bl.label_smoothing_loss, "gce": bl.gce_loss, "intrust": bl.in_trust_loss}[kind]
    return FunctionLossHook(fn, {**BASELINE_DEFAULTS[kind], **params}, ignore_index=IGNORE)


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return max(1, n_rows // batch_size)


def train_epoch(engine, data: Mapping[str, torch.Tensor], batch_size: int, seed: int, epoch: int,
                desc: str) -> float:
    """One epoch in the order ``permutation([seed, epoch])``; -> mean training loss (nan if no batch)."""
    n = data["input_ids"].shape[0]
    order = np.random.default_rng([seed, epoch]).permutation(n)
    engine.train()
    device = engine_device(engine)
    losses = []
    rows_wanted = audit_wants_rows(engine.module)
    bar = progress(range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size), desc=desc, leave=False)
    for start in bar:
        idx = torch.as_tensor(order[start:start + batch_size])
        batch = to_device({k: v[idx] for k, v in data.items()}, device)
        if rows_wanted:  # the poison audit's row ids (indices of the fine-tuning set), popped by the DeCE hook
            batch[ROW_IDS_KWARG] = idx
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return float(np.mean(losses)) if losses else float("nan")


def resolve_auto_alpha(model, dece: Mapping[str, Any], data: Mapping[str, torch.Tensor], batch_size: int, seed: int,
                       quantile: float, epochs: int | None = None,
                       final_half_point: float | None = None) -> tuple[dict, dict]:
    """``dece`` with ``alpha_base`` "auto" replaced by the measured value, and the record ``alpha_auto``
    (the climb cap ``final_half_point`` applies when ``epochs``, the run's length, is given)."""
    from ..auto_alpha import resolve_alpha_base
    from ..config import DeceConfig
    order = torch.as_tensor(np.random.default_rng([seed, 1]).permutation(data["input_ids"].shape[0]))
    batches = ({k: data[k][order[s:s + batch_size]] for k in ("input_ids", "attention_mask", "labels")}
               for s in range(0, len(order), batch_size))
    resolved, record = resolve_alpha_base(model, DeceConfig.from_dict(dece), batches, quantile=quantile,
                                          epoch_target_tokens=int((data["labels"] != IGNORE).sum()),
                                          epochs=epochs, final_half_point=final_half_point)
    return {**dece, "alpha_base": resolved.alpha_base}, record


def dece_section(defaults: Mapping[str, Any], params: Mapping[str, Any], steps_per_epoch: int, model,
                 data: Mapping[str, torch.Tensor], batch_size: int, seed: int, auto_quantile: float,
                 audit_dir=None, epochs: int | None = None,
                 auto_final_half_point: float | None = None) -> tuple[dict, dict | None]:
    """A ``dece`` run's section -> (section, the ``alpha_auto`` record or None).

    A preset in the run spec replaces the experiment's ``defaults`` (explicit keys still win);
    ``alpha_base`` "auto" is measured on ``model`` before the engine exists (``dece_ds.auto_alpha``; the run's
    ``epochs`` and ``auto_final_half_point`` give its climb cap);
    with ``audit_dir`` the poison audit records per-row ``log p_t`` there (``audit_run``).
    """
    base = {} if "preset" in params else {"schedule": "epoch", **defaults}
    dece = {"enabled": True, **base, **params, "steps_per_epoch": steps_per_epoch}
    alpha_auto = None
    if dece.get("alpha_base") == "auto":
        dece, alpha_auto = resolve_auto_alpha(model, dece, data, batch_size, seed, auto_quantile, epochs,
                                              auto_final_half_point)
    if audit_dir is not None:
        dece["audit"] = {"enabled": True, "out": str(audit_dir)}
    return dece, alpha_auto


def _current_alpha(model) -> float | None:
    """The DeCE hook's alpha for the coming step (None without DeCE)."""
    from ..integrations.transformers import current_dece_loss
    hook = current_dece_loss(model)
    if hook is None:
        return None
    # Before this epoch's first step the engine's global_steps points at this epoch already.
    return hook.sync_schedule()
