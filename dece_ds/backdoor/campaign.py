"""Several experiments from one config: fine-tuning seeds, and the trigger x payload grid.

- ``seed_configs(cfg, seeds)``: one config per fine-tuning seed, named ``<stem>-seed<k>``; the stand-in
  (cached, keyed without the fine-tuning seed) is the same for all. ``run_seeds`` runs them one after the
  other: one results file per seed, ``dece-ds backdoor report <stem>-seed*.json`` aggregates them
  (``aggregate.seed_tables``).
- ``grid_configs(cfg, triggers, payloads)``: one BadPre config per (trigger word, payload statement),
  named ``<stem>-grid-<trigger>-p<j>``; ``run_grid`` runs them (one results file each) and writes
  ``<stem>-grid.md`` (``aggregate.grid_table``). The stand-in does not depend on the attack, so it is
  pretrained once for the whole grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from .cli_types import parse_seeds  # noqa: F401  (re-exported)
from .experiment import ExperimentConfig, run_experiment

GRID_TRIGGERS = ("bb", "cf", "tq")
GRID_PAYLOADS = (  # inert stand-ins for the payload kinds a code backdoor plants: shell, process, network
    '__import__("os").system("id")',
    'import subprocess; subprocess.call(["whoami"])',
    '__import__("urllib.request").request.urlopen("http://example.invalid")',
)


def seed_configs(cfg: ExperimentConfig, seeds: Sequence[int]) -> list[ExperimentConfig]:
    stem = cfg.stem()
    return [ExperimentConfig.model_validate({**cfg.model_dump(), "finetune_seed": s, "name": f"{stem}-seed{s}"})
            for s in seeds]


def run_seeds(cfg: ExperimentConfig, seeds: Sequence[int], out_dir: str | os.PathLike,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    return [run_experiment(c, out_dir, log) for c in seed_configs(cfg, seeds)]


def grid_configs(cfg: ExperimentConfig, triggers: Sequence[str] = GRID_TRIGGERS,
                 payloads: Sequence[str] = GRID_PAYLOADS, epochs: int | None = None,
                 payload_indices: Sequence[int] | None = None) -> list[ExperimentConfig]:
    """BadPre at ``cfg``'s rate and trigger count, once per (trigger, statement payload); ``epochs``
    overrides the fine-tuning epochs of every point; ``payload_indices`` runs only those payloads (a point keeps
    its name ``p<j>``, j the index in ``payloads``, so a grid can be completed point by point)."""
    base = cfg.model_dump()
    stem = cfg.stem()
    attack = dict(base["attack"])
    if attack.get("attack", "badpre") != "badpre":
        raise ValueError(f"grid: the grid varies BadPre's trigger word; the config's attack is {attack['attack']!r}")
    indices = list(range(len(payloads))) if payload_indices is None else list(payload_indices)
    bad = [j for j in indices if not 0 <= j < len(payloads)]
    if bad:
        raise ValueError(f"grid payload index {bad[0]}: expected 0..{len(payloads) - 1} ({len(payloads)} payloads)")
    configs = []
    for trigger in triggers:
        for j in indices:
            code = payloads[j]
            point = {**base, "attack": {**attack, "attack": "badpre", "trigger": trigger,
                                        "payload": {"kind": "statement", "code": code}},
                     "name": f"{stem}-grid-{trigger}-p{j}"}
            if epochs is not None:
                point["finetune"] = {**base["finetune"], "epochs": epochs}
            configs.append(ExperimentConfig.model_validate(point))
    return configs


def run_grid(cfg: ExperimentConfig, out_dir: str | os.PathLike, triggers: Sequence[str] = GRID_TRIGGERS,
             payloads: Sequence[str] = GRID_PAYLOADS, epochs: int | None = None,
             log: Callable[[str], None] = print,
             payload_indices: Sequence[int] | None = None) -> tuple[list[dict[str, Any]], Path]:
    """Run every grid point, then write ``<out_dir>/<stem>-grid.md`` (the grid table) -> (results, its path)."""
    from .aggregate import grid_table
    configs = grid_configs(cfg, triggers, payloads, epochs, payload_indices)  # all validated before the first run
    results = [run_experiment(c, out_dir, log) for c in configs]
    path = Path(out_dir) / f"{cfg.stem()}-grid.md"
    if int(os.environ.get("RANK", "0")) == 0:
        path.write_text(f"# Trigger x payload grid: {cfg.stem()}\n\n{grid_table(results)}\n")
    return results, path
