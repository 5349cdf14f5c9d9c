"""Checks of ``dece-ds backdoor run``'s inputs, made before any work (the stand-in's pretraining takes minutes):
each bad input is one ``CliError`` line naming the flag or field and what was expected."""

from __future__ import annotations

import math
from pathlib import Path


class CliError(ValueError):
    """A bad input the CLI reports as one line (``dece-ds backdoor <cmd>: error: ...``) and exit 2."""


def validation_lines(err) -> list[str]:
    """pydantic's ``ValidationError`` as one line per error: ``field.path: message (got value)``."""
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if loc and msg.startswith(f"{loc}: "):
            msg = msg[len(loc) + 2:]
        if item["type"] != "value_error":  # our validators' messages show the value already
            got = repr(item.get("input"))
            msg += f" (got {got if len(got) <= 80 else got[:77] + '...'})"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


def check_runs(cfg) -> None:
    """Each run's loss settings, checked now rather than after the stand-in's pretraining: a ``dece`` run's
    resolved section as ``runner.run_experiment`` builds it (the engine's rules included), a baseline's
    parameters by calling its loss once on a 1-token batch. ``CliError`` naming the run spec."""
    import torch

    from ..config import DeceConfigError
    from ..integrations.deepspeed import dece_config_for_engine
    from .runner import baseline_loss_hook, parse_run

    def one_line(e: Exception) -> str:
        lines = [ln.strip() for ln in str(e).splitlines()]
        return "; ".join(lines[1:] if len(lines) > 1 else lines)

    for spec in cfg.runs:
        kind, params = parse_run(spec)
        try:
            if kind == "dece":  # as run_experiment resolves it (steps_per_epoch is known there)
                defaults = {} if "preset" in params else {"schedule": "epoch", **cfg.dece}
                dece_config_for_engine({"dece": {"enabled": True, **defaults, **params, "steps_per_epoch": 1}})
            elif kind in ("ls", "gce", "intrust"):
                for key, value in params.items():
                    if not isinstance(value, (int, float)) or isinstance(value, bool):
                        raise ValueError(f"{key}: expected a number, got {value!r}")
                baseline_loss_hook(kind, params)(torch.zeros(1, 2, 3), labels=torch.zeros(1, 2, dtype=torch.long))
            elif params:
                raise ValueError(f"takes no parameters, got {params}")
        except (DeceConfigError, ValueError, TypeError) as e:
            raise CliError(f"--runs {spec!r}: {one_line(e)}") from None


def check_values(cfg) -> None:
    """Values the fields' bounds let through but the run would fail on later (after the tokenizer or the
    pretraining): the stand-in's shape, negative seeds (numpy's generators refuse them), an infinite lr."""
    m = cfg.model
    if not m.checkpoint and m.n_embd % m.n_head:
        raise CliError(f"--width {m.n_embd}: must be a multiple of model.n_head ({m.n_head})")
    for flag, seed in (("--seed", cfg.seed), ("--finetune-seed", cfg.finetune_seed)):
        if seed is not None and seed < 0:
            raise CliError(f"{flag}: must be >= 0, got {seed}")
    for flag, lr in (("--lr", cfg.finetune.lr), ("pretrain.lr", cfg.pretrain.lr)):
        if not math.isfinite(lr):
            raise CliError(f"{flag}: must be finite, got {lr}")


def check_paths(cfg, out: str) -> None:
    """The folders a run reads and writes, checked before any work: ``CliError`` naming the flag."""
    for flag, value in (("--out", out), ("--cache-dir", cfg.cache_dir)):
        if Path(value).exists() and not Path(value).is_dir():
            raise CliError(f"{flag} {value}: exists and is not a folder")
    if cfg.dataset != "stdlib":
        try:
            folder = cfg.dataset_folder()
        except (OSError, ValueError) as e:
            raise CliError(f"--dataset {cfg.dataset}: {e}") from None
        if not folder.is_dir():
            raise CliError(f"--dataset {cfg.dataset}: not 'stdlib' and not a folder (expected a Lyra-layout "
                           "folder with train.csv, valid.csv, test.csv)")
        missing = [f for f in ("train.csv", "valid.csv", "test.csv") if not (folder / f).is_file()]
        if missing:
            raise CliError(f"--dataset {cfg.dataset}: missing {', '.join(missing)}")
        for name in ("train.csv", "valid.csv", "test.csv"):  # the loader reads them as UTF-8
            raw = (folder / name).read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CliError(f"--dataset {cfg.dataset}: {name}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                               f"offset {e.start})") from None
    ckpt = cfg.model.checkpoint
    if ckpt and not (Path(ckpt) / "config.json").is_file():
        raise CliError(f"--checkpoint {ckpt}: not a local Hugging Face model folder (no config.json in it)")
