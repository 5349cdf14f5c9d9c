"""AlphaSchedule: alpha = alpha_base ** e against hand-computed numbers, for the epoch, continuous and
constant schedules, the CE warm-up, state round trips and bad epochs / steps."""

from __future__ import annotations

import copy
import math

import pytest

from dece_ds import AlphaSchedule, DeceConfig
from dece_ds.schedule import alpha_for_exponent


def sched(**kw) -> AlphaSchedule:
    return AlphaSchedule(DeceConfig(**kw))


def alphas_by_epoch(s: AlphaSchedule, n: int) -> list[float]:
    """alpha at epochs 1..n, set explicitly."""
    got = []
    for e in range(1, n + 1):
        s.set_epoch(e)
        got.append(s.alpha)
    return got


# --- epoch schedule -----------------------------------------------------------------------------------

def test_epoch_schedule_starts_at_epoch_one():
    s = sched(alpha_base=0.99)
    assert s.current_epoch == 1
    assert s.alpha == pytest.approx(0.99, rel=1e-15)


@pytest.mark.parametrize("epoch,expected", [(1, 0.99), (2, 0.9801), (3, 0.970299), (20, 0.8179069375972307)])
def test_set_epoch(epoch, expected):
    s = sched(alpha_base=0.99)
    s.set_epoch(epoch)
    assert s.current_epoch == epoch
    assert s.alpha == pytest.approx(expected, rel=1e-12)


def test_alpha_values_of_the_paper_settings():
    s = sched(alpha_base=0.985)
    s.set_epoch(3)
    assert s.alpha == pytest.approx(0.985 * 0.985 * 0.985, rel=1e-14)
    s = sched(alpha_base=0.8)
    s.set_epoch(5)
    assert s.alpha == pytest.approx(0.32768, rel=1e-14)


def test_epoch_from_steps():
    """With steps_per_epoch, e = 1 + step // steps_per_epoch (integer epochs)."""
    s = sched(alpha_base=0.9, steps_per_epoch=10)
    expected = {0: 1, 1: 1, 9: 1, 10: 2, 19: 2, 20: 3, 35: 4}
    for step, epoch in expected.items():
        s.set_step(step)
        assert s.current_epoch == epoch, step
        assert s.alpha == pytest.approx(0.9**epoch, rel=1e-14), step


def test_advance_counts_steps():
    s = sched(alpha_base=0.9, steps_per_epoch=4)
    for _ in range(7):
        s.advance()
    assert s.step == 7 and s.current_epoch == 2
    s.advance(5)
    assert s.step == 12 and s.current_epoch == 4
    assert s.alpha == pytest.approx(0.9**4)


def test_set_epoch_overrides_step_count():
    s = sched(alpha_base=0.9, steps_per_epoch=10)
    s.set_step(55)
    assert s.current_epoch == 6
    s.set_epoch(2)
    assert s.current_epoch == 2 and s.alpha == pytest.approx(0.81)


def test_epoch_schedule_without_steps_per_epoch_stays_at_epoch_one():
    s = sched(alpha_base=0.9)
    s.advance(1000)
    assert s.current_epoch == 1 and s.alpha == pytest.approx(0.9)


# --- continuous and constant --------------------------------------------------------------------------

@pytest.mark.parametrize("step,exponent", [(0, 1.0), (5, 1.5), (10, 2.0), (25, 3.5), (3, 1.3)])
def test_continuous_schedule(step, exponent):
    s = sched(alpha_base=0.99, schedule="continuous", steps_per_epoch=10)
    s.set_step(step)
    assert s.exponent == pytest.approx(exponent, rel=1e-15)
    assert s.alpha == pytest.approx(math.exp(exponent * math.log(0.99)), rel=1e-13)


def test_continuous_is_monotone_and_meets_epoch_schedule_at_boundaries():
    cont = sched(alpha_base=0.95, schedule="continuous", steps_per_epoch=8)
    epoch = sched(alpha_base=0.95, steps_per_epoch=8)
    alphas = []
    for step in range(0, 41):
        cont.set_step(step)
        epoch.set_step(step)
        alphas.append(cont.alpha)
        if step % 8 == 0:
            assert cont.alpha == pytest.approx(epoch.alpha, rel=1e-14)
    assert all(a > b for a, b in zip(alphas, alphas[1:]))


@pytest.mark.parametrize("steps_per_epoch", [None, 3])
def test_constant_schedule(steps_per_epoch):
    s = sched(alpha_base=0.97, schedule="constant", steps_per_epoch=steps_per_epoch)
    for step in (0, 1, 10, 1000):
        s.set_step(step)
        assert s.alpha == 0.97
    s.set_epoch(9)
    assert s.alpha == 0.97


def test_alpha_base_one_is_always_one():
    s = sched(alpha_base=1.0, steps_per_epoch=2)
    s.set_step(100)
    assert s.alpha == 1.0


# --- CE warm-up -----------------------------------------------------------------------------------------

def test_ce_warmup_epochs_via_set_epoch():
    got = alphas_by_epoch(sched(alpha_base=0.9, ce_warmup_epochs=2), 5)
    assert got[:2] == [1.0, 1.0]
    assert got[2:] == pytest.approx([0.9**3, 0.9**4, 0.9**5], rel=1e-14)


def test_ce_warmup_epochs_via_steps():
    s = sched(alpha_base=0.9, ce_warmup_epochs=1, steps_per_epoch=5)
    s.set_step(4)
    assert s.alpha == 1.0
    s.set_step(5)
    assert s.alpha == pytest.approx(0.81)


def test_ce_warmup_with_continuous_schedule():
    s = sched(alpha_base=0.9, ce_warmup_epochs=1, schedule="continuous", steps_per_epoch=10)
    s.set_step(9)
    assert s.alpha == 1.0
    s.set_step(15)
    assert s.alpha == pytest.approx(0.9**2.5)


def test_alpha_min_floors_the_decay():
    got = alphas_by_epoch(sched(alpha_base=0.9, alpha_min=0.75), 5)
    # 0.9, 0.81, 0.729 -> 0.75, 0.6561 -> 0.75, ...
    assert got == pytest.approx([0.9, 0.81, 0.75, 0.75, 0.75], rel=1e-14)


def test_alpha_min_zero_is_the_paper_schedule_and_warmup_still_wins():
    assert alphas_by_epoch(sched(alpha_base=0.9, alpha_min=0.0), 5) == pytest.approx(
        [0.9, 0.81, 0.729, 0.6561, 0.59049], rel=1e-14)
    s = sched(alpha_base=0.9, alpha_min=0.8, ce_warmup_epochs=1)
    s.set_epoch(1)
    assert s.alpha == 1.0


# --- state ----------------------------------------------------------------------------------------------

def test_state_dict_round_trip():
    s = sched(alpha_base=0.9, steps_per_epoch=10)
    s.advance(37)
    state = s.state_dict()
    assert state == {"step": 37, "epoch": None}
    t = sched(alpha_base=0.9, steps_per_epoch=10)
    t.load_state_dict(copy.deepcopy(state))
    assert t.step == 37 and t.alpha == s.alpha == pytest.approx(0.9**4)

    s.set_epoch(7)
    t.load_state_dict(s.state_dict())
    assert t.epoch == 7 and t.alpha == pytest.approx(0.9**7)


def test_state_dict_is_plain_data():
    s = sched()
    s.set_epoch(2)
    s.advance(3)
    state = s.state_dict()
    assert all(isinstance(v, (int, type(None))) for v in state.values())


def test_load_state_dict_missing_keys():
    with pytest.raises(KeyError, match="step"):
        sched().load_state_dict({"epoch": 2})


# --- errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("epoch", [0, -1, 1.5])
def test_bad_epoch(epoch):
    s = sched()
    with pytest.raises(ValueError, match="epoch") as e:
        s.set_epoch(epoch)
    assert repr(epoch) in str(e.value)
    assert s.epoch is None  # unchanged


@pytest.mark.parametrize("step", [-1, 2.5])
def test_bad_step(step):
    with pytest.raises(ValueError, match="step"):
        sched().set_step(step)


def test_alpha_for_exponent():
    assert alpha_for_exponent(0.99, 3) == pytest.approx(0.970299, rel=1e-14)
    assert alpha_for_exponent(0.5, 1) == 0.5
    with pytest.raises(ValueError, match="exponent"):
        alpha_for_exponent(0.99, 0.5)
