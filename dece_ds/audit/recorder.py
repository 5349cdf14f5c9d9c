"""The poison audit's training-time record: per training row, per step, each trained token's ``log p_t``.

What is stored (``<out>/rank00000.jsonl``, one file per writing rank, append-only, flushed per write):

    {"header": {"format": 1, "vocab_size": V, "label_smoothing": eps, "prob_floor": f, "rank": r}}
    {"step": s, "epoch": e, "alpha": a, "rows": [id, ...], "pos": [[i, ...], ...], "tok": [[t, ...], ...],
     "logp": [[log p_t, ...], ...]}                                  one line per loss call (micro-batch)

``step`` is the optimizer step being computed (0-based: ``global_steps`` before ``engine.step()``), ``epoch``
the schedule's epoch (from 1), ``rows`` the stable ids of the micro-batch's rows (the data path's indices
into the training set), and per row the positions, target ids and ``log p_t`` (fp32, 4 decimals) of its
trained (non-ignored) tokens. DeCE's per-token weight ``w = a*p/(a*p + (1-a)(1-eps))`` (p floored at f) and
"refused" (``w < 1/2``) follow from these at scoring time, so the record keeps the raw signal only.

Where the numbers come from: the loss Functions' side output ``log_p_out`` (``ops/dece.py``,
``ops/vocab_parallel.py``, ``ops/fused_linear.py``): ``log p_t = (z_t - shift) - log_norm`` from the
log-sum-exp every path already computes; under vocab-parallel TP the owner rank's value rides in the
forward's existing all-reduce (no extra collective), and only TP rank 0 of each group writes.

Resume: ``keep_steps_before(out, global_steps)`` drops the records of the steps a resumed run redoes
(atomically, as ``recipes.run_log`` does for the step log), and a torn last line (a kill mid-write) is
skipped on reading.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

import torch

FORMAT = 1
ROW_IDS_KWARG = "dece_row_ids"   # the model-forward keyword the DeCE hook takes the row ids from


class AuditRecordError(ValueError):
    """A record folder that cannot be read back: missing, empty, corrupt, or not an audit record."""


def audit_wants_rows(model) -> bool:
    """Whether ``model`` has a DeCE hook with an audit recorder (then pass ``dece_row_ids`` to its forward)."""
    from ..integrations.loss_hook import current_hook
    return getattr(current_hook(model), "recorder", None) is not None


def rank_file(out: str | os.PathLike, rank: int) -> Path:
    return Path(out) / f"rank{rank:05d}.jsonl"


class AuditRecorder:
    """Appends per-row ``log p_t`` records of one rank to ``<out>/rank<rank>.jsonl``.

    ``write=False`` (a TP rank other than 0, whose numbers equal rank 0's) makes every call a no-op.
    """

    def __init__(self, out: str | os.PathLike, *, vocab_size: int | None, label_smoothing: float,
                 prob_floor: float, rank: int = 0, write: bool = True):
        self.out, self.rank, self.write = Path(out), int(rank), bool(write)
        self.header = {"format": FORMAT, "vocab_size": vocab_size, "label_smoothing": float(label_smoothing),
                       "prob_floor": float(prob_floor), "rank": self.rank}
        self._file: TextIO | None = None
        self.lines = 0

    @property
    def path(self) -> Path:
        return rank_file(self.out, self.rank)

    def _open(self) -> TextIO:
        if self._file is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(json.dumps({"header": self.header}) + "\n")
        return self._file

    def observe(self, rows, target: torch.Tensor, log_p: torch.Tensor, *, ignore_index: int, alpha: float,
                step: int, epoch: int, vocab_size: int | None = None) -> None:
        """``rows`` ``[B]`` ids; ``target`` ``[B, T]`` shifted targets; ``log_p`` ``[B*T]`` or ``[B, T]``."""
        if not self.write:
            return
        if self.header["vocab_size"] is None and vocab_size is not None:
            self.header["vocab_size"] = int(vocab_size)
        ids = [int(r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
        target = target.reshape(len(ids), -1) if target.dim() != 2 else target
        if target.shape[0] != len(ids):
            raise ValueError(f"{ROW_IDS_KWARG}: {len(ids)} row id(s) for a batch of {target.shape[0]} rows "
                             "(packed or reshaped batches cannot be mapped to rows)")
        t = target.detach().cpu()
        lp = log_p.detach().reshape(t.shape).float().cpu()
        pos, tok, logp = [], [], []
        for i in range(len(ids)):
            keep = (t[i] != ignore_index).nonzero().flatten()
            pos.append(keep.tolist())
            tok.append(t[i, keep].tolist())
            logp.append([round(x, 4) for x in lp[i, keep].tolist()])
        record = {"step": int(step), "epoch": int(epoch), "alpha": float(alpha), "rows": ids, "pos": pos,
                  "tok": tok, "logp": logp}
        f = self._open()
        f.write(json.dumps(record) + "\n")
        f.flush()
        self.lines += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ---- reading ----------------------------------------------------------------------------------------------

@dataclass
class RowEpoch:
    """One row's trained tokens in one epoch (its last visit in that epoch)."""

    row: int
    epoch: int
    step: int
    alpha: float
    pos: list[int]
    tok: list[int]
    logp: list[float]


@dataclass
class AuditRecord:
    header: dict[str, Any]
    visits: dict[int, dict[int, RowEpoch]]   # row id -> epoch -> visit
    files: list[Path]
    torn: int = 0

    @property
    def rows(self) -> list[int]:
        return sorted(self.visits)

    @property
    def epochs(self) -> list[int]:
        return sorted({e for v in self.visits.values() for e in v})


def _lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if line.strip():
            yield i + 1, line, i == len(lines) - 1


def read_record(out: str | os.PathLike) -> AuditRecord:
    """Every rank file under ``out`` merged; ``AuditRecordError`` naming the file and line for bad input."""
    out = Path(out)
    if not out.is_dir():
        raise AuditRecordError(f"{out}: no audit record folder (train with \"dece\": {{\"audit\": "
                               "{\"enabled\": true, \"out\": ...}} first)")
    files = sorted(out.glob("rank*.jsonl"))
    if not files:
        raise AuditRecordError(f"{out}: no rank*.jsonl record files in it")
    header: dict[str, Any] | None = None
    visits: dict[int, dict[int, RowEpoch]] = {}
    torn = 0
    for path in files:
        for n, line, last in _lines(path):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if last:
                    torn += 1   # a kill mid-write; the step is redone after a resume
                    break
                raise AuditRecordError(f"{path}: line {n} is not JSON ({e.msg}); the record is corrupt") from None
            if "header" in rec:
                h = {k: v for k, v in rec["header"].items() if k != "rank"}
                if h.get("format") != FORMAT:
                    raise AuditRecordError(f"{path}: line {n}: record format {h.get('format')}, expected {FORMAT}")
                if header is not None and h != header:
                    raise AuditRecordError(f"{path}: line {n}: header {h} differs from {header} (records of "
                                           "different runs in one folder)")
                header = h
                continue
            if header is None:
                raise AuditRecordError(f"{path}: line {n} comes before the header line")
            try:
                rows, pos, tok, logp = rec["rows"], rec["pos"], rec["tok"], rec["logp"]
                step, epoch, alpha = int(rec["step"]), int(rec["epoch"]), float(rec["alpha"])
                if not (len(rows) == len(pos) == len(tok) == len(logp)):
                    raise ValueError("rows/pos/tok/logp lengths differ")
            except (KeyError, TypeError, ValueError) as e:
                raise AuditRecordError(f"{path}: line {n}: not an audit step record ({e})") from None
            for r, p, t, lp in zip(rows, pos, tok, logp):
                if not (len(p) == len(t) == len(lp)):
                    raise AuditRecordError(f"{path}: line {n}: row {r}: pos/tok/logp lengths differ")
                # a row seen twice in one epoch (a resumed step re-recorded): the later step wins
                prev = visits.setdefault(int(r), {}).get(epoch)
                if prev is None or step >= prev.step:
                    visits[int(r)][epoch] = RowEpoch(int(r), epoch, step, alpha, p, t, lp)
    if header is None or not visits:
        raise AuditRecordError(f"{out}: the record holds no step (was the run stopped before its first step, or "
                               "were no row ids passed to the loss?)")
    return AuditRecord(header, visits, files, torn)


def keep_steps_before(out: str | os.PathLike, global_steps: int) -> int:
    """Resume: drop the records of steps ``>= global_steps`` (the steps the resumed run redoes) and a torn last
    line from every rank file, each rewritten atomically. Returns the number of step records dropped."""
    from ..recipes.run_log import write_atomically
    dropped = 0
    for path in sorted(Path(out).glob("rank*.jsonl")) if Path(out).is_dir() else []:
        kept, changed = [], False
        for _, line, last in _lines(path):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if last:
                    changed = True
                    continue
                raise AuditRecordError(f"{path}: a corrupt line before the last; cannot resume its record") from None
            if "header" not in rec and int(rec.get("step", -1)) >= global_steps:
                dropped += 1
                changed = True
                continue
            kept.append(line)
        if changed:
            write_atomically(path, "".join(x + "\n" for x in kept))
    return dropped


META = "meta.json"


def write_meta(record_dir: str | os.PathLike, run_out: str | os.PathLike | None, meta: dict[str, Any]) -> None:
    """``<record>/meta.json``: what ``dece-ds audit`` needs to decode the rows (tokenizer, data, labels), and
    ``<run_out>/audit_record.json`` pointing at the record folder."""
    from ..recipes.run_log import write_atomically
    Path(record_dir).mkdir(parents=True, exist_ok=True)
    write_atomically(Path(record_dir) / META, json.dumps(meta, indent=1))
    if run_out is not None:
        write_atomically(Path(run_out) / "audit_record.json",
                         json.dumps({"record": str(Path(record_dir).resolve())}))


def read_meta(record_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(record_dir) / META
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AuditRecordError(f"{path}: not JSON ({e.msg})") from None


def find_record_dir(run_out: str | os.PathLike) -> Path:
    """``RUN_OUT`` may be the record folder itself, a run folder with ``audit_record.json``, or one with ``audit/``."""
    run_out = Path(run_out)
    if not run_out.exists():
        raise AuditRecordError(f"{run_out}: no such folder")
    if any(run_out.glob("rank*.jsonl")):
        return run_out
    pointer = run_out / "audit_record.json"
    if pointer.is_file():
        return Path(json.loads(pointer.read_text(encoding="utf-8"))["record"])
    if (run_out / "audit").is_dir():
        return run_out / "audit"
    raise AuditRecordError(f"{run_out}: no audit record in it (no rank*.jsonl, audit_record.json or audit/); "
                           "train with \"dece\": {\"audit\": {\"enabled\": true, \"out\": ...}}")


def weight(logp: float, alpha: float, label_smoothing: float, prob_floor: float) -> float:
    """DeCE's per-token gradient weight against CE, ``a*p/(a*p + (1-a)(1-eps))`` with p floored."""
    p = max(math.exp(logp), prob_floor)
    off = (1.0 - alpha) * (1.0 - label_smoothing)
    return 1.0 if off <= 0 else alpha * p / (alpha * p + off)
