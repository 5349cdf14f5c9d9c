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
   - ``fused_linear: true``: ``fused_linear_dece`` from the final hidden states and ``lm_head.weight``
     (with AutoTP's vocab-parallel head: this rank's weight shard, the head's own forward bypassed),
     never building the logits.
   All three are modes of one ``integrations.hook.DeceHook``: ``current_dece_loss``,
   ``dece_client_state``, alpha logging and ``remove_dece_from_engine`` see every mode.
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

from ..config import DeceConfig, DeceConfigError, read_ds_config
from .hook import announce
from .transformers import current_dece_loss, install_dece_loss, remove_dece_loss

CLIENT_STATE_KEY = "dece"


def _engine_rules(cfg: DeceConfig, steps_per_epoch_later: bool = False) -> DeceConfig:
    """Rules that hold for the engine integration on top of DeceConfig's own."""
    errors = []
    if cfg.enabled:
        if cfg.schedule in ("epoch", "continuous") and cfg.steps_per_epoch is None and not steps_per_epoch_later:
            errors.append(f"  dece.steps_per_epoch: required with schedule='{cfg.schedule}' under DeepSpeed "
                          "(alpha follows engine.global_steps; give the optimizer steps per epoch) (got None)")
        if cfg.reduction == "none":
            errors.append("  dece.reduction: the engine's backward needs a scalar loss; use 'mean' or 'sum' "
                          "(got 'none')")
    if errors:
        raise DeceConfigError(f"invalid 'dece' section ({len(errors)} error(s)):\n" + "\n".join(errors))
    return cfg


def _load_ds_config(config) -> Mapping[str, Any] | None:
    """A DeepSpeed config as a dict: dicts as they are; JSON files by ``read_ds_config`` (one line naming the
    file when it is not a JSON object); other strings (hjson, base64) as DeepSpeed reads them."""
    import os
    if config is None or isinstance(config, Mapping):
        return config
    if isinstance(config, os.PathLike) or (isinstance(config, str) and (os.path.exists(config)
                                                                        or config.endswith(".json"))):
        return read_ds_config(config)
    try:
        from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config
    except ImportError:  # DeepSpeed without it: plain JSON files
        return read_ds_config(config)
    try:
        return load_ds_config(config)
    except (ValueError, OSError) as e:
        raise DeceConfigError(f"ds_config: cannot read {config!r}: {e}") from None


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


def dece_config_for_engine(ds_config, *, steps_per_epoch_later: bool = False) -> DeceConfig:
    """Validate the ``dece`` section of a DeepSpeed config (path or dict) for the engine integration.

    ``steps_per_epoch_later``: the caller computes ``steps_per_epoch`` from its data and fills it in
    (``cfg.model_copy(update=...)``) before ``initialize(..., dece_config=cfg)``.
    """
    ds_config = _load_ds_config(ds_config)
    section = ds_config.get("dece") if isinstance(ds_config, Mapping) else None
    if steps_per_epoch_later and isinstance(section, Mapping):
        return _engine_rules(DeceConfig.from_dict(section, steps_per_epoch_later=True), steps_per_epoch_later=True)
    return _engine_rules(DeceConfig.from_ds_config(ds_config))


def initialize(*args, dece_config: DeceConfig | None = None, **kwargs):
    """``deepspeed.initialize`` with DeCE from the config's ``dece`` section (see the module docstring).

    Takes the arguments of ``deepspeed.initialize`` and returns its tuple
    ``(engine, optimizer, training_dataloader, lr_scheduler)``. ``dece_config``: a section the caller
    has validated already (``dece_config_for_engine``); the config's own ``dece`` key is then not read.
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
    if dece_config is not None:
        if not isinstance(dece_config, DeceConfig):
            raise TypeError(f"dece_config: expected a DeceConfig, got {type(dece_config).__name__}")
        cfg = _engine_rules(dece_config)
    else:
        cfg = dece_config_for_engine(ds_config_from_initialize_args(bound))
    if cfg.enabled:  # "auto": resolve_alpha_base(model, cfg, batches) before initialize
        cfg.require_alpha_resolved()
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
    return install_dece_loss(module, cfg, step_source=engine_step_source(engine))


def remove_dece_from_engine(engine) -> bool:
    """Put back the model's own loss (and, after ``fused_linear``, its ``lm_head``); False if DeCE was not on."""
    return remove_dece_loss(engine.module)


def dece_client_state(engine) -> dict[str, Any]:
    """``{"dece": {...}}`` to merge into ``engine.save_checkpoint(..., client_state=...)``: the section, the
    mode (``logits`` / ``vocab_shard`` / ``hidden``), the schedule state and alpha."""
    hook = current_dece_loss(engine.module)
    if hook is None:
        return {CLIENT_STATE_KEY: {"enabled": False}}
    return {CLIENT_STATE_KEY: hook.record()}


def dece_client_state_differences(engine, client_state: Mapping[str, Any] | None) -> list[str]:
    """What differs between a checkpoint's dece record and this engine's: ``["dece.alpha_base: 0.9 -> 0.97",
    ...]``; empty when they agree or the checkpoint has no record."""
    saved = (client_state or {}).get(CLIENT_STATE_KEY)
    if saved is None:
        return []
    now = dece_client_state(engine)[CLIENT_STATE_KEY]
    diffs = []
    for key in ("enabled", "mode"):
        if key in saved and saved.get(key) != now.get(key):
            diffs.append(f"dece {key}: {saved.get(key)!r} in the checkpoint, {now.get(key)!r} now")
    saved_cfg, now_cfg = saved.get("config") or {}, now.get("config") or {}
    for key in sorted(set(saved_cfg) | set(now_cfg)):
        if saved_cfg.get(key) != now_cfg.get(key):
            diffs.append(f"dece.{key}: {saved_cfg.get(key)!r} in the checkpoint, {now_cfg.get(key)!r} now")
    if not diffs and saved.get("schedule") is not None and saved.get("schedule") != now.get("schedule"):
        diffs.append(f"dece schedule state: {saved.get('schedule')} in the checkpoint, {now.get('schedule')} now")
    return diffs


def check_dece_client_state(engine, client_state: Mapping[str, Any] | None) -> list[str]:
    """After ``engine.load_checkpoint``: warn about each difference in the dece record; returns them."""
    diffs = dece_client_state_differences(engine, client_state)
    for diff in diffs:
        announce(f"resume: {diff}")
    return diffs
