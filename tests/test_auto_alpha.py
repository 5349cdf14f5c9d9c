"""alpha_base "auto": the rule on a synthetic p_t distribution, end to end on a tiny model, and every
consumer that needs a number refusing an unresolved "auto" with one message."""

import json
import re

import pytest
import torch

from dece_ds import DeceConfig, DeceLoss
from dece_ds.auto_alpha import (
    alpha_base_from_probs,
    alpha_for_weight,
    dece_weight,
    first_exponent,
    measure_target_probs,
    resolve_alpha_base,
    token_budget,
)
from dece_ds.config import ALPHA_AUTO_UNRESOLVED, DeceConfigError
from dece_ds.schedule import AlphaSchedule

MESSAGE = 'dece.alpha_base: "auto" must be resolved before training (dece_ds.auto_alpha.resolve_alpha_base)'


def test_config_accepts_auto_and_keeps_its_bounds():
    assert DeceConfig(alpha_base="auto").alpha_base == "auto"
    assert DeceConfig.from_dict({"alpha_base": "auto", "alpha_min": 0.5}).alpha_min == 0.5  # no comparison yet
    assert DeceConfig(alpha_base=1).alpha_base == 1.0
    for bad, msg in [(2, "less than or equal to 1 (got 2)"), (0, "greater than 0 (got 0)"),
                     ("x", 'a number in (0, 1] or "auto" (got \'x\')'), (True, 'a number in (0, 1] or "auto" (got True)')]:
        with pytest.raises(DeceConfigError, match=re.escape("dece.alpha_base: Input should be " + msg)):
            DeceConfig.from_dict({"alpha_base": bad})
    assert DeceConfig.model_json_schema()["properties"]["alpha_base"]["anyOf"][1] == {"const": "auto", "type": "string"}


def test_unresolved_auto_is_refused_by_every_consumer():
    assert ALPHA_AUTO_UNRESOLVED == MESSAGE
    cfg = DeceConfig(alpha_base="auto", steps_per_epoch=10)
    with pytest.raises(DeceConfigError, match="must be resolved before training"):
        AlphaSchedule(cfg)
    with pytest.raises(DeceConfigError) as e:
        DeceLoss(cfg)
    assert str(e.value) == MESSAGE
    import dece_ds
    with pytest.raises(DeceConfigError) as e:  # before any engine or process-group work
        dece_ds.initialize(model=torch.nn.Linear(2, 2), config={"train_micro_batch_size_per_gpu": 1,
                                                               "dece": {"alpha_base": "auto", "steps_per_epoch": 5}})
    assert str(e.value) == MESSAGE


def test_rule_on_a_synthetic_distribution():
    eps = 0.05
    torch.manual_seed(0)
    p_t = torch.cat([torch.full((800,), 0.5), torch.logspace(-6, -1, 200)])  # a 20 % tail from 1e-6 to 0.1
    cfg = DeceConfig(label_smoothing=eps, alpha_base="auto")
    alpha, rec = alpha_base_from_probs(p_t, cfg, quantile=0.1)
    # by hand: the 10th percentile of 1000 values sits at rank 0.1 * 999 = 99.9 of the sorted values, the tail
    # 10 ** (-6 + 5 i / 199) for i < 200 (linear interpolation between ranks 99 and 100)
    lo, hi = 10 ** (-6 + 5 * 99 / 199), 10 ** (-6 + 5 * 100 / 199)
    p_q = lo + 0.9 * (hi - lo)
    assert 1e-4 < p_q < 1e-3  # inside the tail
    assert rec["p_at_quantile"] == pytest.approx(p_q) and rec["tokens"] == 1000 and rec["first_exponent"] == 1.0
    assert alpha == pytest.approx((1 - eps) / (p_q + 1 - eps))
    assert dece_weight(p_q, alpha, eps) == pytest.approx(0.5)  # half of CE's gradient at the q-th percentile
    assert dece_weight(0.5, alpha, eps) > 0.99  # the tokens the model predicts: nearly CE's gradient
    assert dece_weight(1e-6, alpha, eps) < 0.01  # a payload-like tail token: refused
    assert dece_weight(torch.tensor([1e-6, p_q, 0.5]), alpha, eps).tolist() == pytest.approx(
        [1e-6 / (1e-6 + p_q), 0.5, 0.5 / (0.5 + p_q)])  # w(p) = p / (p + p_q)
    assert set(rec["p_t_quantiles"]) == {"0.01", "0.05", "0.1", "0.25", "0.5"}
    # after a CE warm-up the first DeCE epoch is e = 3: alpha_base ** 3 hits the same alpha
    warm = DeceConfig(label_smoothing=eps, alpha_base="auto", ce_warmup_epochs=2)
    assert first_exponent(warm) == 3.0 and first_exponent(DeceConfig(schedule="constant", ce_warmup_epochs=2)) == 1.0
    alpha_w, rec_w = alpha_base_from_probs(p_t, warm, quantile=0.1)
    assert alpha_w ** 3 == pytest.approx(alpha) and rec_w["alpha_first_epoch"] == pytest.approx(alpha)
    assert alpha_for_weight(0.01, eps, 0.9) > alpha_for_weight(0.01, eps, 0.5)  # more weight: larger alpha
    with pytest.raises(ValueError, match="quantile"):
        alpha_base_from_probs(p_t, cfg, quantile=1.0)


def test_token_budget():
    assert token_budget(100_000) == 2000  # 2 % of the epoch's target tokens
    assert token_budget(1000) == 256 and token_budget(10 ** 8) == 8192 and token_budget(None) == 8192


class _TinyLM(torch.nn.Module):
    """A causal LM's interface (``.logits``), a fixed distribution per previous token."""

    def __init__(self, vocab=11):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.emb(input_ids)})()


def test_end_to_end_on_a_tiny_model():
    model = _TinyLM().train()
    ids = torch.randint(0, 11, (6, 9))
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt: no loss
    batches = [{"input_ids": ids[i:i + 2], "attention_mask": torch.ones(2, 9, dtype=torch.long),
                "labels": labels[i:i + 2]} for i in range(0, 6, 2)]
    p = measure_target_probs(model, batches, max_tokens=1000)
    logp = torch.log_softmax(model.emb(ids)[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    ref = logp[tgt != -100].gather(1, tgt[tgt != -100].unsqueeze(1)).squeeze(1).exp()
    assert torch.allclose(p, ref) and model.training  # the training mode comes back
    assert measure_target_probs(model, batches, max_tokens=7).numel() == 7
    cfg = DeceConfig(alpha_base="auto", steps_per_epoch=3)
    resolved, rec = resolve_alpha_base(model, cfg, batches, min_tokens=10, max_tokens=30)
    assert resolved.alpha_base == pytest.approx(rec["alpha_base"]) and rec["tokens"] == 30
    assert resolved.model_dump(exclude={"alpha_base"}) == cfg.model_dump(exclude={"alpha_base"})
    AlphaSchedule(resolved)  # a number now
    import dece_ds
    assert dece_ds.resolve_alpha_base is resolve_alpha_base  # public: call it before dece_ds.initialize
    same, none = resolve_alpha_base(model, DeceConfig(alpha_base=0.9), batches)
    assert same.alpha_base == 0.9 and none is None
    with pytest.raises(ValueError, match="no target tokens"):
        measure_target_probs(model, [{"input_ids": ids[:1], "labels": torch.full((1, 9), -100)}], 10)


def test_hf_trainer_refuses_unresolved_auto_when_applied():
    from types import SimpleNamespace

    from dece_ds.integrations.transformers import apply_dece_to_trainer
    trainer = SimpleNamespace(args=SimpleNamespace(deepspeed=None), callback_handler=SimpleNamespace(callbacks=[]))
    with pytest.raises(DeceConfigError) as e:
        apply_dece_to_trainer(trainer, config={"alpha_base": "auto", "steps_per_epoch": 5})
    assert str(e.value) == MESSAGE


def _half_point_by_hand(alpha, eps):
    """w(p) = a p / (a p + (1 - a)(1 - eps)) = 1/2  <=>  p = (1 - a)(1 - eps) / a."""
    return (1 - alpha) * (1 - eps) / alpha


@pytest.mark.parametrize("epochs,warmup", [(10, 0), (8, 0), (10, 2), (3, 0)])
def test_climb_caps_the_pick_so_the_last_epoch_half_point_is_reached(epochs, warmup):
    eps = 0.05
    p_t = torch.cat([torch.full((800,), 0.6), torch.logspace(-6, -3, 200)])  # q = 0.1 sits deep in the tail
    cfg = DeceConfig(label_smoothing=eps, alpha_base="auto", ce_warmup_epochs=warmup, steps_per_epoch=4)
    quantile_only, rec_q = alpha_base_from_probs(p_t, cfg, quantile=0.1)
    assert rec_q["rule"] == "quantile" and "p_half_last_epoch" not in rec_q  # no run length: the old rule
    alpha, rec = alpha_base_from_probs(p_t, cfg, quantile=0.1, epochs=epochs, final_half_point=0.3)
    assert rec["rule"] == "final_half_point" and alpha < quantile_only
    assert rec["alpha_base_quantile"] == pytest.approx(quantile_only)
    # the schedule's own alpha at the last epoch puts the half-gradient point at 0.3
    schedule = AlphaSchedule(cfg.model_copy(update={"alpha_base": alpha}))
    schedule.set_epoch(epochs)
    assert _half_point_by_hand(schedule.alpha, eps) == pytest.approx(0.3)
    assert rec["p_half_last_epoch"] == pytest.approx(0.3)
    assert dece_weight(0.3, schedule.alpha, eps) == pytest.approx(0.5)
    # the by-hand closed form: a_E = (1 - eps) / (0.3 + 1 - eps), alpha_base = a_E ** (1 / E)
    assert alpha == pytest.approx(((1 - eps) / (0.3 + 1 - eps)) ** (1 / epochs))


def test_climb_leaves_a_lower_quantile_pick_and_constant_schedules_alone():
    eps = 0.05
    p_t = torch.cat([torch.full((500,), 0.9), torch.full((500,), 0.5)])
    cfg = DeceConfig(label_smoothing=eps, alpha_base="auto")
    alpha, rec = alpha_base_from_probs(p_t, cfg, quantile=0.4, epochs=2, final_half_point=0.3)
    assert rec["rule"] == "quantile" and alpha == pytest.approx((1 - eps) / (0.5 + 1 - eps))  # p_q = 0.5
    assert rec["p_half_last_epoch"] == pytest.approx(_half_point_by_hand(alpha ** 2, eps))
    const = DeceConfig(label_smoothing=eps, alpha_base="auto", schedule="constant")
    p_tail = torch.logspace(-6, -1, 100)
    a_const, rec_c = alpha_base_from_probs(p_tail, const, quantile=0.1, epochs=10, final_half_point=0.3)
    assert rec_c["rule"] == "quantile" and rec_c["alpha_base_final_half_point"] is None
    assert a_const == pytest.approx(alpha_base_from_probs(p_tail, const, quantile=0.1)[0])
    off, rec_off = alpha_base_from_probs(p_tail, cfg, quantile=0.1, epochs=10, final_half_point=None)
    assert rec_off["rule"] == "quantile" and off == pytest.approx(alpha_base_from_probs(p_tail, cfg, 0.1)[0])
    with pytest.raises(ValueError, match="final_half_point"):
        alpha_base_from_probs(p_tail, cfg, epochs=10, final_half_point=1.0)
    with pytest.raises(ValueError, match="epochs"):
        alpha_base_from_probs(p_tail, cfg, epochs=0)


def test_resolve_passes_the_run_length():
    model = _TinyLM()
    ids = torch.randint(0, 11, (4, 9))
    batches = [{"input_ids": ids, "labels": ids.clone()}]
    cfg = DeceConfig(alpha_base="auto", steps_per_epoch=3)
    resolved, rec = resolve_alpha_base(model, cfg, batches, min_tokens=10, max_tokens=30, epochs=5,
                                       final_half_point=0.3)
    assert rec["epochs"] == 5 and rec["final_half_point"] == 0.3
    assert resolved.alpha_base <= ((1 - 0.05) / 1.25) ** (1 / 5) + 1e-12  # never above the climb's cap


def test_backdoor_cli_takes_the_climb_flag(capsys):
    from dece_ds.cli import main
    assert main(["backdoor", "run", "--auto-alpha-final-half-point", "0.25", "--auto-alpha-quantile", "0.2",
                 "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["auto_alpha_final_half_point"] == 0.25 and printed["auto_alpha_quantile"] == 0.2
    assert main(["backdoor", "run", "--auto-alpha-final-half-point", "1.5", "--print-config"]) == 2
    assert "auto_alpha_final_half_point: Input should be less than 1" in capsys.readouterr().err
