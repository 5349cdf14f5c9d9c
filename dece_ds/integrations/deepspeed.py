"""``dece_ds.initialize``: ``deepspeed.initialize`` plus DeCE as the model's loss. Plumbing only.

Users add one top-level section to their DeepSpeed JSON and call ``dece_ds.initialize`` where they
called ``deepspeed.initialize`` (same arguments, same returned tuple)::

    "tensor_parallel": {"autotp_size": 2, "vocab_parallel_lm_head": true},
    "zero_optimization": {"stage": 3},
    "dece": {"enabled": true, "label_smoothing": 0.05, "alpha_base": 0.99,
             "schedule": "epoch", "steps_per_epoch": 500}

    engine, optimizer, dataloader, lr_scheduler = dece_ds.initialize(model=model, config="ds.json", ...)

Order of work:
1. Read the ``dece`` section (from ``config`` / ``config_params`` / ``args.deepspeed_config``) and
   validate it, with the engine's extra rules (``steps_per_epoch`` for the epoch and continuous
   schedules; a scalar reduction). A bad section raises ``DeceConfigError`` naming ``dece.<field>``
   before any engine or process-group work. DeepSpeed itself ignores the unknown top-level ``dece``
   key (checked with 0.19.8), so the config goes to DeepSpeed unchanged.
2. ``deepspeed.initialize(...)`` with the caller's arguments, untouched.
3. ``enabled: false`` stops here: the pipeline's loss is exactly what it was. Otherwise DeCE becomes
   ``engine.module.loss_function`` (the HF causal-LM loss hook):
   - DeepSpeed AutoTP with ``vocab_parallel_lm_head: true``: DeepSpeed has installed its
     ``VocabParallelCausalLMLoss`` on the ``VocabParallelLinear`` head; DeCE replaces it and runs
     ``vocab_parallel_dece`` on the same shard layout (the head's ``mp_group``, ``vocab_start_index``,
     ``vocab_size``), so the logits are never gathered;
   - otherwise (no TP, or TP with a gathered head): ``dece_loss`` on the full logits;
   - ``fused_linear: true`` (no vocab-parallel head): ``fused_linear_dece`` from the final hidden
     states and ``lm_head.weight`` (``integrations.hf_fused_linear``), never building the logits.
4. Alpha: ``AlphaSchedule`` driven by ``engine.global_steps`` (optimizer steps taken), read at every
   forward: ``alpha = alpha_base ** (1 + global_steps // steps_per_epoch)`` for ``"epoch"``.

Checkpoints: the schedule state is a function of ``engine.global_steps``, which
``engine.save_checkpoint`` stores and ``engine.load_checkpoint`` restores, so a resumed run has the
same alpha with nothing extra saved. ``dece_client_state(engine)`` gives a record of the section and
schedule to put in ``client_state`` (``check_dece_client_state`` warns if a resume changes it).
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Mapping

from ..config import DeceConfig, DeceConfigError
from .transformers import announce, current_dece_loss, install_dece_loss, remove_dece_loss

CLIENT_STATE_KEY = "dece"


def _engine_rules(cfg: DeceConfig) -> DeceConfig:
    """Rules that hold for the engine integration on top of DeceConfig's own."""
    errors = []
    if cfg.enabled:
        if cfg.schedule in ("epoch", "continuous") and cfg.steps_per_epoch is None:
            errors.append(f"  dece.steps_per_epoch: required with schedule='{cfg.schedule}' under DeepSpeed "
                          "(alpha follows engine.global_steps; give the optimizer steps per epoch) (got None)")
        if cfg.reduction == "none":
            errors.append("  dece.reduction: the engine's backward needs a scalar loss; use 'mean' or 'sum' "
                          "(got 'none')")
    if errors:
        raise DeceConfigError(f"invalid 'dece' section ({len(errors)} error(s)):\n" + "\n".join(errors))
    return cfg


def _load_ds_config(config) -> Mapping[str, Any] | None:
    """A DeepSpeed config as a dict: dicts as they are; paths (JSON / hjson) and base64 as DeepSpeed reads them."""
    if config is None or isinstance(config, Mapping):
        return config
    try:
        from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config
    except ImportError:  # DeepSpeed without it: plain JSON files
        load_ds_config = _read_json
    try:
        return load_ds_config(config)
    except (ValueError, OSError) as e:
        raise DeceConfigError(f"ds_config: cannot read {config!r}: {e}") from None


def _read_json(path) -> Mapping[str, Any]:
    import json
    with open(path) as f:
        return json.load(f)


def ds_config_from_initialize_args(bound: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The DeepSpeed config dict that ``deepspeed.initialize`` would use, from its bound arguments."""
    config = bound.get("config")
    if config is None:
        config = bound.get("config_params")
    args = bound.get("args")
    for attr in ("deepspeed_config", "deepscale_config"):
        value = getattr(args, attr, None) if args is not None else None
        if config is None and value is not None:
            config = value
    return _load_ds_config(config)


def dece_config_for_engine(ds_config) -> DeceConfig:
    """Validate the ``dece`` section of a DeepSpeed config (path or dict) for the engine integration."""
    return _engine_rules(DeceConfig.from_ds_config(_load_ds_config(ds_config)))


def initialize(*args, **kwargs):
    """``deepspeed.initialize`` with DeCE from the config's ``dece`` section (see the module docstring).

    Takes exactly the arguments of ``deepspeed.initialize`` and returns its tuple
    ``(engine, optimizer, training_dataloader, lr_scheduler)``.
    """
    import deepspeed

    signature = inspect.signature(deepspeed.initialize)
    try:
        bound = dict(signature.bind(*args, **kwargs).arguments)
    except TypeError as e:
        raise TypeError(f"dece_ds.initialize takes the arguments of deepspeed.initialize: {e}") from None
    for name, param in signature.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            bound.update(bound.pop(name, {}))
    cfg = dece_config_for_engine(ds_config_from_initialize_args(bound))
    model = bound.get("model")
    if cfg.enabled:
        if model is not None and not hasattr(model, "loss_function"):
            raise AttributeError(
                f"{type(model).__qualname__}.loss_function: not found; dece_ds.initialize installs DeCE "
                "through the Hugging Face causal-LM loss hook. For another model use dece_ds.DeceLoss in "
                "its loss, or set dece.enabled to false")
        try:
            from deepspeed.pipe import PipelineModule
        except ImportError:
            PipelineModule = ()
        if isinstance(model, PipelineModule):
            raise TypeError("model: a PipelineModule has no HF loss hook; use dece_ds.DeceLoss as its loss_fn")

    result = deepspeed.initialize(*args, **kwargs)
    if not cfg.enabled:
        announce("dece.enabled is false (or no 'dece' section): the model keeps its own loss")
        return result
    apply_dece_to_engine(result[0], cfg)
    return result


def engine_step_source(engine):
    """``() -> engine.global_steps`` without keeping the engine alive (the model holds the hook)."""
    ref = weakref.ref(engine)

    def global_steps() -> int:
        live = ref()
        if live is None:
            raise RuntimeError("engine: the DeepSpeed engine that drives the DeCE alpha schedule is gone")
        return int(live.global_steps)

    return global_steps


def apply_dece_to_engine(engine, config):
    """Install DeCE as ``engine.module.loss_function`` (idempotent; ``remove_dece_from_engine`` undoes it).

    ``config``: DeceConfig, a ``dece`` section, or a DeepSpeed config (path / dict).
    """
    if not isinstance(config, DeceConfig):
        from .transformers import resolve_dece_config
        config = resolve_dece_config(config)
    cfg = _engine_rules(config)
    if not cfg.enabled:
        raise DeceConfigError("dece.enabled: false; nothing to apply (got False)")
    module = getattr(engine, "module", None)
    if module is None:
        raise AttributeError(f"{type(engine).__qualname__}.module: not found; expected a DeepSpeedEngine")
    if cfg.fused_linear:
        from ..parallel.vocab_shard import find_vocab_parallel_head
        from .hf_fused_linear import apply_fused_linear_dece
        if find_vocab_parallel_head(module) is not None:
            raise DeceConfigError("dece.fused_linear: not supported yet with AutoTP's vocab-parallel lm_head; "
                                  "the vocab-parallel DeCE already never gathers the logits (got True)")
        return apply_fused_linear_dece(module, cfg, step_source=engine_step_source(engine))
    return install_dece_loss(module, cfg, step_source=engine_step_source(engine))


def remove_dece_from_engine(engine) -> bool:
    return remove_dece_loss(engine.module)


def dece_client_state(engine) -> dict[str, Any]:
    """``{"dece": {...}}`` to merge into ``engine.save_checkpoint(..., client_state=...)``."""
    hook = current_dece_loss(engine.module)
    if hook is None:
        return {CLIENT_STATE_KEY: {"enabled": False}}
    hook.sync_schedule()
    return {CLIENT_STATE_KEY: {"enabled": True, "config": hook.config.to_ds_section(),
                               "schedule": hook.schedule.state_dict(), "alpha": hook.schedule.alpha}}


def check_dece_client_state(engine, client_state: Mapping[str, Any] | None) -> None:
    """After ``engine.load_checkpoint``: warn if the checkpoint's dece section or schedule differs."""
    saved = (client_state or {}).get(CLIENT_STATE_KEY)
    if saved is None:
        return
    now = dece_client_state(engine)[CLIENT_STATE_KEY]
    if saved.get("enabled") != now.get("enabled") or saved.get("config") != now.get("config"):
        announce(f"resume: the checkpoint was trained with dece={saved.get('config', saved)}, this run uses "
                 f"dece={now.get('config', now)}")
    elif saved.get("schedule") != now.get("schedule"):
        announce(f"resume: schedule state {now.get('schedule')} differs from the checkpoint's "
                 f"{saved.get('schedule')}")
