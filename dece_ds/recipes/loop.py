"""The step loop shared by fine-tuning and continued pretraining.

Per optimizer step: this rank's gradient-accumulation micro-batches (moved to the engine's device),
forward / backward / step for each, one all-reduce of (loss sum, micro-batches, tokens) on the
accelerator's device, a log record, a checkpoint when due. A source that can run dry (a streaming
corpus) adds one all-reduce of a "got a batch" flag, so every rank stops at the same step.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.distributed as dist

from ..integrations.transformers import current_dece_loss
from .run_log import RunLog
from .runtime import all_reduce, engine_device, to_device

MicroBatches = Callable[[int], "list[dict[str, Any]] | None"]


@dataclass
class LoopResult:
    steps: int = 0                 # optimizer steps this process ran
    tokens: int = 0                # tokens trained on this run (all data-parallel ranks)
    first_loss: float | None = None
    last_loss: float | None = None
    end_of_data: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)


def train_steps(engine, micro_batches: MicroBatches, *, total_steps: int, run_log: RunLog,
                save: Callable[..., None], save_every: int = 0, tp: int = 1, can_run_dry: bool = False,
                extra: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
                crash_after_step: int | None = None, crash_mid_save_step: int | None = None,
                progress=None) -> LoopResult:
    """Run optimizer steps until ``engine.global_steps == total_steps`` (or the data runs dry).

    ``micro_batches(step)`` gives this rank's micro-batches of optimizer step ``step`` (0-based), each a
    dict of model inputs with ``attention_mask``, or None when the data has ended.
    ``save(crash_mid_save=False)`` writes a checkpoint. ``extra(record, step)`` adds fields to the step's log record. ``tp``: ranks per
    data-parallel group (they see the same tokens). ``crash_*``: testing only (SIGKILL every rank).
    """
    result = LoopResult()
    device = engine_device(engine)
    hook = current_dece_loss(engine.module)
    while engine.global_steps < total_steps:
        step = engine.global_steps
        t0 = time.perf_counter()
        batches = micro_batches(step)
        if can_run_dry:
            have = all_reduce([0.0 if batches is None else 1.0], op=dist.ReduceOp.MIN)[0]
            if have == 0.0:
                result.end_of_data = True
                break
        loss_sum = n_micro = tokens = 0.0
        for batch in batches:
            tokens += float(batch["attention_mask"].sum())  # counted where the batch was made: no device sync
            loss = engine(**to_device(batch, device)).loss
            engine.backward(loss)
            engine.step()
            loss_sum, n_micro = loss_sum + loss.item(), n_micro + 1
        loss_sum, n_micro, tokens = all_reduce([loss_sum, n_micro, tokens])
        dt = time.perf_counter() - t0
        step_tokens = int(tokens / tp)  # TP ranks repeat their DP group's numbers: the ratio is the DP mean
        record = {"step": engine.global_steps, "loss": loss_sum / n_micro,
                  "alpha": hook.last_alpha if hook is not None else None,
                  "lr": engine.get_lr()[0] if engine.get_lr() else None, "tokens": step_tokens,
                  "step_time_s": dt}
        if extra is not None:
            record.update(extra(record, step))
        run_log.write(record)
        result.records.append(record)
        result.steps += 1
        result.tokens += step_tokens
        result.first_loss = record["loss"] if result.first_loss is None else result.first_loss
        result.last_loss = record["loss"]
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", alpha=record["alpha"])
            progress.update(1)
        done = engine.global_steps >= total_steps
        if done or (save_every and engine.global_steps % save_every == 0):
            crash = crash_mid_save_step == engine.global_steps
            if crash:
                run_log.close()
            save(crash_mid_save=crash)
        if crash_after_step == engine.global_steps:
            run_log.close()
            os.kill(os.getpid(), signal.SIGKILL)
    return result
