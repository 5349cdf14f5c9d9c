"""``alpha_base: "auto"``: set DeCE's alpha_base from the model's own probabilities of its training targets.

DeCE scales CE's gradient on a target token with probability ``p`` by

    w(p) = alpha * p / (alpha * p + (1 - alpha) * (1 - eps))          (eps: label_smoothing)

so ``w`` is 1/2 at ``p_half = (1 - alpha)(1 - eps) / alpha`` and ``w(p) = p / (p + p_half)``: tokens far
above ``p_half`` keep nearly CE's gradient, tokens far below it get ``p / p_half`` of it. The rule: measure
``p_t`` for a sample of the fine-tuning targets with ONE forward pass of the model before training, and
put ``p_half`` at their ``quantile``-th percentile (default q = 0.1), at the first epoch DeCE trains with:

    alpha_1 = (1 - eps) / (p_q + (1 - eps))          (w(p_q) = 1/2; general target weight: see below)
    alpha_base = alpha_1 ** (1 / e_1)                  e_1: the schedule's exponent at the first DeCE step

Why this rule (docs/backdoor.md, "alpha_base auto"): a payload token is one the pretrained model finds
very unlikely (its p_t sits orders of magnitude below the clean targets'), while the bulk of the clean
targets, hard ones included, sit above the low percentiles of p_t. Placing the half-gradient point at a
low percentile of the measured distribution refuses the tail (where the payload lives, poison being a few
percent of the tokens) and leaves the tokens the model already predicts nearly CE's gradient. As alpha
decays (``alpha_base ** e``) ``p_half`` rises epoch by epoch, as in the paper.

The climb (``final_half_point``, default 0.3; applied when the run's ``epochs`` are given and the schedule
decays): the percentile sets where ``p_half`` starts, not how far it rises, and measured runs show the rise
decides (docs/backdoor.md, "alpha_base auto"): with the strong attacks measured the backdoor was learned
wherever ``p_half`` at the last epoch stayed at 0.17 or below (0.080, 0.10, 0.17) and refused where it
reached 0.21 or above (0.21, 0.26, 0.34): a payload seen again epoch after epoch climbs in probability and
must stay under ``p_half``. So alpha_base is also capped by the value that puts ``p_half`` at
``final_half_point`` at the last epoch:

    alpha_base = min(rule above, alpha_for_weight(final_half_point) ** (1 / e_last))   e_last: epochs

Sample: the first batches given, up to ``sample_fraction`` (2 %) of an epoch's target tokens, at least
``min_tokens`` (256, for tiny sets) and at most ``max_tokens`` (8192). The measurement is a plain forward
pass on full logits (``log_softmax`` + gather), so it runs on the model *before* the engine shards it:
under DeepSpeed call it before ``initialize`` (AutoTP splits the head at ``initialize``; a ZeRO-3 model
built under ``zero.Init`` is already partitioned, so measure before that or on an unpartitioned copy)::

    cfg, info = dece_ds.auto_alpha.resolve_alpha_base(model, DeceConfig.from_ds_config("ds.json"), batches,
                                                      epoch_target_tokens=n_target_tokens)
    engine, *_ = dece_ds.initialize(model=model, model_parameters=model.parameters(), config="ds.json",
                                    dece_config=cfg)

``batches``: an iterable of dicts with ``input_ids``, ``attention_mask`` (optional) and ``labels``
(``ignore_index`` where no loss), labels aligned with the inputs as Hugging Face causal LMs take them
(the model shifts them; so does this measurement).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from .config import DeceConfig, DeceConfigError

DEFAULT_QUANTILE = 0.1
DEFAULT_FINAL_HALF_POINT = 0.3
TARGET_WEIGHT = 0.5
SAMPLE_FRACTION = 0.02
MIN_TOKENS, MAX_TOKENS = 256, 8192
REPORTED_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5)


def dece_weight(p: float | torch.Tensor, alpha: float, label_smoothing: float):
    """w = alpha p / (alpha p + (1 - alpha)(1 - eps)): DeCE's gradient on a target token over CE's."""
    return alpha * p / (alpha * p + (1.0 - alpha) * (1.0 - label_smoothing))


def alpha_for_weight(p: float, label_smoothing: float, weight: float = TARGET_WEIGHT) -> float:
    """The alpha at which a token of probability ``p`` gets ``weight`` of CE's gradient (``dece_weight`` = weight)."""
    if not 0.0 < weight < 1.0:
        raise ValueError(f"weight: must be in (0, 1), got {weight}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p: must be in (0, 1], got {p}")
    a = weight * (1.0 - label_smoothing)
    return a / (p * (1.0 - weight) + a)


def first_exponent(config: DeceConfig) -> float:
    """The schedule's exponent e at the first step DeCE trains with (after a CE warm-up)."""
    if config.schedule == "constant":
        return 1.0
    return 1.0 + config.ce_warmup_epochs  # epoch: epoch counted from 1; continuous: 1 + step / spe


def last_exponent(config: DeceConfig, epochs: int) -> float | None:
    """The schedule's exponent e at the last epoch of an ``epochs``-epoch run (the epoch schedule's last epoch;
    the continuous one ends just below it); None for ``constant``, whose alpha never climbs."""
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs: a whole number >= 1, got {epochs!r}")
    return None if config.schedule == "constant" else float(epochs)


def half_point(alpha: float, label_smoothing: float) -> float:
    """p_half = (1 - alpha)(1 - eps) / alpha: the target probability that keeps half of CE's gradient."""
    return (1.0 - alpha) * (1.0 - label_smoothing) / alpha


@torch.no_grad()
def measure_target_probs(model, batches: Iterable[Mapping[str, torch.Tensor]], max_tokens: int,
                         ignore_index: int = -100) -> torch.Tensor:
    """p_t of the first ``max_tokens`` target tokens of ``batches`` (float32, 1-D), one forward pass each batch,
    eval mode (no dropout), the model's training mode restored after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs, n = [], 0
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            logits = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device)).logits
            logits, target = logits[:, :-1].float(), batch["labels"][:, 1:].to(device)
            keep = target != ignore_index
            logp = torch.log_softmax(logits[keep], dim=-1).gather(1, target[keep].unsqueeze(1)).squeeze(1)
            probs.append(logp.exp().cpu())
            n += probs[-1].numel()
            if n >= max_tokens:
                break
    finally:
        model.train(was_training)
    if not probs or n == 0:
        raise ValueError("batches: no target tokens (every label is ignore_index, or no batch)")
    return torch.cat(probs)[:max_tokens]


def alpha_base_from_probs(p_t: torch.Tensor, config: DeceConfig, quantile: float = DEFAULT_QUANTILE,
                          weight: float = TARGET_WEIGHT, *, epochs: int | None = None,
                          final_half_point: float | None = DEFAULT_FINAL_HALF_POINT) -> tuple[float, dict[str, Any]]:
    """The rule (module docstring) on measured probabilities -> (alpha_base, the record ``alpha_auto``).

    With ``epochs`` (the run's length) and ``final_half_point`` the climb caps the pick; the record then says
    which part set it (``"rule"``: ``"quantile"`` or ``"final_half_point"``) and ``p_half_last_epoch``."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile: must be in (0, 1), got {quantile}")
    if final_half_point is not None and not 0.0 < final_half_point < 1.0:
        raise ValueError(f"final_half_point: must be in (0, 1) or None, got {final_half_point}")
    p_t = p_t.double().flatten()
    p_q = float(torch.quantile(p_t, quantile))
    p_used = max(p_q, config.prob_floor, 1e-12)  # the loss clamps p at prob_floor too
    alpha_1 = alpha_for_weight(p_used, config.label_smoothing, weight)
    e_1 = first_exponent(config)
    by_quantile = alpha_1 ** (1.0 / e_1)
    e_last = None if epochs is None else last_exponent(config, epochs)
    by_climb = (None if e_last is None or final_half_point is None
                else alpha_for_weight(final_half_point, config.label_smoothing, TARGET_WEIGHT) ** (1.0 / e_last))
    rule = "final_half_point" if by_climb is not None and by_climb < by_quantile else "quantile"
    picked = by_climb if rule == "final_half_point" else by_quantile
    alpha_base = min(1.0, max(picked, config.alpha_min, 1e-6))
    record = {"alpha_base": alpha_base, "alpha_first_epoch": alpha_base ** e_1, "quantile": quantile,
              "target_weight": weight, "p_at_quantile": p_q, "first_exponent": e_1,
              "p_t_quantiles": {f"{q:g}": float(torch.quantile(p_t, q)) for q in REPORTED_QUANTILES},
              "tokens": int(p_t.numel()), "rule": rule, "alpha_base_quantile": min(1.0, by_quantile),
              "final_half_point": final_half_point, "epochs": epochs, "alpha_base_final_half_point": by_climb}
    if e_last is not None:
        record["p_half_last_epoch"] = half_point(max(alpha_base ** e_last, config.alpha_min), config.label_smoothing)
    return alpha_base, record


def token_budget(epoch_target_tokens: int | None, sample_fraction: float = SAMPLE_FRACTION,
                 min_tokens: int = MIN_TOKENS, max_tokens: int = MAX_TOKENS) -> int:
    """Tokens measured: ``sample_fraction`` of an epoch's, clamped to [min_tokens, max_tokens] (max_tokens if
    the epoch's count is unknown)."""
    if epoch_target_tokens is None:
        return max_tokens
    return int(min(max_tokens, max(min_tokens, math.ceil(sample_fraction * epoch_target_tokens))))


def resolve_alpha_base(model, config: DeceConfig, batches: Iterable[Mapping[str, torch.Tensor]], *,
                       quantile: float = DEFAULT_QUANTILE, weight: float = TARGET_WEIGHT,
                       epoch_target_tokens: int | None = None, sample_fraction: float = SAMPLE_FRACTION,
                       min_tokens: int = MIN_TOKENS, max_tokens: int = MAX_TOKENS, epochs: int | None = None,
                       final_half_point: float | None = DEFAULT_FINAL_HALF_POINT
                       ) -> tuple[DeceConfig, dict[str, Any] | None]:
    """``config`` with ``alpha_base`` measured from ``model`` on ``batches`` when it is ``"auto"`` (else
    ``config`` unchanged and None) -> (resolved DeceConfig, the record ``alpha_auto``: ``alpha_base``,
    ``quantile``, ``p_t_quantiles``, ``tokens``, ``rule``, ...). Call it before ``dece_ds.initialize``.

    Give ``epochs`` (the run's fine-tuning epochs): without it only the percentile rule applies, which
    did not defend the measured settings (module docstring)."""
    if not isinstance(config, DeceConfig):
        raise TypeError(f"config: expected a DeceConfig, got {type(config).__name__}")
    if config.alpha_base != "auto":
        return config, None
    budget = token_budget(epoch_target_tokens, sample_fraction, min_tokens, max_tokens)
    p_t = measure_target_probs(model, batches, budget, config.ignore_index)
    alpha_base, record = alpha_base_from_probs(p_t, config, quantile, weight, epochs=epochs,
                                               final_half_point=final_half_point)
    record["budget_tokens"] = budget
    try:
        resolved = config.model_copy(update={"alpha_base": alpha_base})
        DeceConfig.from_dict(resolved.model_dump(mode="json"), steps_per_epoch_later=True)  # re-validate
    except DeceConfigError as e:
        raise DeceConfigError(f"alpha_base auto -> {alpha_base}: {e}") from None
    return resolved, record
