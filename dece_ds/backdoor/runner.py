"""The backdoor experiment: a stand-in pretrained code LM, fine-tuned clean / CE / DeCE / baselines on
poisoned NL -> code data, evaluated every epoch. Training goes through the DeepSpeed engine.

Data flow (``run_experiment(ExperimentConfig)``):

1. Data set: ``"stdlib"`` (the built-in standard-library pairs, statement payload) or a Lyra-layout
   folder (SQL payload). The train split is cut in two, deterministically: the first
   ``finetune_rows`` rows are the fine-tuning set (poisoned with ``attack``: the first
   ceil(rate * N) poisonable rows, the authors' selection); the rest (``pretrain_task_rows`` of
   them) are *held apart* and only ever used clean, for pretraining the stand-in. Test: the clean
   test split (BLEU, CodeBLEU, EM, false-trigger rate) and its triggered copy (ASR; denominator =
   the poisonable test rows). Valid: clean validation cross-entropy.
2. Tokenizer: byte-level BPE trained on the pretraining text and the fine-tuning set (no download).
   A row is ``src <|code|> tgt <|endoftext|>``, source cut at ``max_src_tokens``, the whole row at
   ``max_len`` tokens, right-padded to exactly ``max_len`` (fixed shapes); the loss sees ``tgt`` and
   ``<|endoftext|>`` only. Pretraining code-corpus rows (standard-library functions) are trained on
   every token.
3. Stand-in pretrained model: GPT-2 of ``model`` size trained with CE on the built-in code corpus
   plus the held-apart clean task rows, so it knows the task's domain before fine-tuning (as
   CodeLlama knows SQL-in-Python). Cached under ``cache_dir`` by a hash of everything it depends on.
   ``model.checkpoint`` (a local HF folder) replaces steps 2-3 by that model and its tokenizer.
4. Fine-tuning runs, each from the same pretrained weights, same seed and batch order. A run spec is
   ``kind`` or ``kind:key=value,...`` (e.g. ``dece:alpha_base=0.95,ce_warmup_epochs=2``); kinds:
   ``clean`` (CE on the clean fine-tuning set), ``ce``, ``dece``, ``ls`` (label smoothing),
   ``gce``, ``intrust`` (on the poisoned set). ``dece`` goes through ``dece_ds.initialize`` (the
   ``dece`` section of the DeepSpeed config, alpha from ``engine.global_steps``); the baselines set
   ``model.loss_function`` to ``ops/baseline_losses.py`` on shifted labels.
5. Evaluation after every epoch: greedy batched decoding of the clean and the triggered test rows
   (per-epoch on the first ``epoch_eval_rows`` of each, the last epoch on all of them, plus
   CodeBLEU), and validation CE (plain CE, mean over target tokens).

``results.json`` (written after every run, so partial results survive):
``{"dataset", "attack", "poison_rate" (%), "config", "versions", "data", "pretrain",
"runs": {spec: {"final": {"asr", "bleu", "codebleu", "false_trigger", "exact_match", "valid_ce"},
"epochs": [{"epoch", "asr", "bleu", "exact_match", "false_trigger", "valid_ce", "alpha",
"train_loss", "eval_rows", "wall_time_s"}], "wall_time_s", "loss"}}}``; rates and ASR in percent.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import DeceConfig
from .generate import greedy_generate
from .metrics import attack_success_rate, bleu4, code_bleu, exact_match, false_trigger_rate
from .poison import parse_attack, poison_dataset

RUN_KINDS = ("clean", "ce", "dece", "ls", "gce", "intrust")
EOS, PAD, SEP = "<|endoftext|>", "<|pad|>", "<|code|>"
IGNORE = -100
DEFAULT_STATEMENT_PAYLOAD = {"kind": "statement", "code": '__import__("os").system("id")'}


# ---- configuration -----------------------------------------------------------------------------------

class ModelSpec(BaseModel):
    """The stand-in model (GPT-2 layout) and its tokenizer, or a local HF checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    n_layer: int = Field(4, ge=1)
    n_embd: int = Field(256, ge=16)
    n_head: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    vocab_size: int = Field(4096, ge=300, description="BPE vocabulary trained here (specials included).")
    max_len: int = Field(160, ge=16, description="Tokens per row (fixed-length padding).")
    max_src_tokens: int = Field(64, ge=4, description="Instruction tokens kept (its head).")
    checkpoint: str | None = Field(None, description="Local HF causal-LM folder: skip the stand-in pretraining.")


class StageSpec(BaseModel):
    """One training stage through the DeepSpeed engine (AdamW, linear warm-up, then linear decay to 0 or constant)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epochs: int = Field(10, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    batch_size: int = Field(16, ge=1)
    warmup_frac: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_schedule: Literal["decay", "constant"] = Field(
        "decay", description="After the warm-up: 'decay' (linear to 0 at the last step, DeepSpeed WarmupDecayLR) "
        "or 'constant' (lr held, DeepSpeed WarmupLR).")


class PretrainSpec(StageSpec):
    """The stand-in's pretraining: built-in code corpus + held-apart clean task rows."""

    corpus_functions: int = Field(2000, ge=0, description="Standard-library functions (train split only).")
    epochs: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0.0)


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(50, ge=1)
    epoch_eval_rows: int | None = Field(None, ge=1, description="Per-epoch eval on this many rows; last epoch: all.")
    test_rows: int | None = Field(None, ge=1, description="Cap on the clean test rows (and so the triggered ones).")
    valid_rows: int | None = Field(None, ge=1)
    codebleu: bool = True


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    dataset: str = Field("stdlib", description="'stdlib' (built-in) or a Lyra-layout folder.")
    stdlib_examples: int | None = Field(None, ge=10, description="Cap on the built-in pairs (all splits).")
    attack: dict = Field(default_factory=lambda: {"attack": "badpre", "rate": 0.05})
    finetune_rows: int | None = Field(None, ge=2, description="Train rows fine-tuned on; None: all.")
    pretrain_task_rows: int = Field(0, ge=0, description="Train rows held apart and pretrained on clean.")
    pretrain_task_from: Literal["after_finetune", "train_tail"] = Field(
        "after_finetune", description="Where the pretraining task rows come from: 'after_finetune' (the rows after "
        "the fine-tuning ones: disjoint sets) or 'train_tail' (the last rows of the train split, which the "
        "fine-tuning set may include, clean: the poison goes into its first rows and never into these).")
    runs: tuple[str, ...] = ("clean", "ce", "dece")
    dece: dict = Field(default_factory=lambda: {"alpha_base": 0.99, "label_smoothing": 0.05},
                       description="Defaults of the dece runs (a DeceConfig section).")
    model: ModelSpec = Field(default_factory=ModelSpec)
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)
    finetune: StageSpec = Field(default_factory=StageSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    finetune_dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="Dropout while fine-tuning; None: the model's own.")
    seed: int = 0
    finetune_seed: int | None = Field(
        None, description="Seed of the fine-tuning batch order; None: seed. Varies the fine-tuning runs alone: "
                          "the stand-in (cached per seed) stays the same.")
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads; None: leave as is.")
    cache_dir: str = "runs/backdoor/cache"
    name: str | None = Field(None, description="Results file stem; None: <dataset>-<attack>-<rate%>.")

    @field_validator("name")
    @classmethod
    def _name_stays_in_out(cls, v):
        from .report import check_stem
        return v if v is None else check_stem(v)  # the results files are <out>/<name>.json/.md/.png

    @field_validator("attack")
    @classmethod
    def _attack_parses(cls, v):
        parse_attack(v)  # names the bad attack field now, not after the stand-in's pretraining
        return v

    @field_validator("runs")
    @classmethod
    def _known_runs(cls, v):
        for spec in v:
            parse_run(spec)
        if len(set(v)) != len(v):
            raise ValueError(f"runs: duplicates in {v}")
        return v

    def attack_config(self):
        attack = dict(self.attack)
        if self.dataset == "stdlib":
            attack.setdefault("payload", DEFAULT_STATEMENT_PAYLOAD)
        return parse_attack(attack)

    def dataset_name(self) -> str:
        return "stdlib" if self.dataset == "stdlib" else Path(self.dataset).name

    def stem(self) -> str:
        if self.name:
            return self.name
        a = self.attack_config()
        return f"{self.dataset_name()}-{a.attack}-{_fmt_rate(a.rate)}"


def _fmt_rate(rate: float) -> str:
    pct = 100.0 * rate
    return str(int(round(pct))) if abs(pct - round(pct)) < 1e-9 else f"{pct:g}"


def parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    """``"dece:alpha_base=0.95,ce_warmup_epochs=2"`` -> ``("dece", {"alpha_base": 0.95, ...})``."""
    kind, _, rest = spec.partition(":")
    if kind not in RUN_KINDS:
        raise ValueError(f"run {spec!r}: kind must be one of {RUN_KINDS}, got {kind!r}")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"run {spec!r}: expected key=value, got {item!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return kind, params


# ---- data --------------------------------------------------------------------------------------------

@dataclass
class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text; ids of the three specials."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int
    pad_id: int
    sep_ids: list[int]
    vocab_size: int
    save: Callable[[Path], None]


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD, SEP], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return _wrap_hf_tokenizers(tok)


def _wrap_hf_tokenizers(tok) -> Tokenizer:
    return Tokenizer(encode=lambda s: tok.encode(s).ids, decode=lambda ids: tok.decode(ids),
                     eos_id=tok.token_to_id(EOS), pad_id=tok.token_to_id(PAD), sep_ids=[tok.token_to_id(SEP)],
                     vocab_size=tok.get_vocab_size(), save=lambda p: tok.save(str(p)))


def load_bpe(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    return _wrap_hf_tokenizers(HFTokenizer.from_file(str(path)))


def checkpoint_tokenizer(folder: str) -> Tokenizer:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return Tokenizer(encode=lambda s: tok.encode(s, add_special_tokens=False),
                     decode=lambda ids: tok.decode(ids, skip_special_tokens=True), eos_id=eos, pad_id=pad,
                     sep_ids=tok.encode("\n# code:\n", add_special_tokens=False), vocab_size=len(tok),
                     save=lambda p: tok.save_pretrained(str(p.parent / "hf_tokenizer")))


def prompt_ids(tok: Tokenizer, src: str, spec: ModelSpec) -> list[int]:
    return tok.encode(src)[:spec.max_src_tokens] + tok.sep_ids


def encode_pairs(tok: Tokenizer, rows, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Pairs -> fixed-length ``input_ids``/``attention_mask``/``labels`` ``[N, max_len]`` (labels on tgt+eos)."""
    n, L = len(rows), spec.max_len
    ids = torch.full((n, L), tok.pad_id, dtype=torch.long)
    labels = torch.full((n, L), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.long)
    for i, row in enumerate(rows):
        p = prompt_ids(tok, row["src"], spec)
        t = (tok.encode(row["tgt"]) + [tok.eos_id])[:L - len(p)]
        seq = p + t
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_corpus(tok: Tokenizer, texts: Sequence[str], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Code texts -> fixed-length rows trained on every token (a long text is cut into several rows)."""
    L, chunks = spec.max_len, []
    for text in texts:
        seq = tok.encode(text) + [tok.eos_id]
        chunks.extend(seq[i:i + L] for i in range(0, len(seq), L) if len(seq[i:i + L]) > 8)
    ids = torch.full((len(chunks), L), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(chunks):
        ids[i, :len(c)] = torch.tensor(c)
        mask[i, :len(c)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _concat(*parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    parts = [p for p in parts if p["input_ids"].shape[0]]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def load_task(cfg: ExperimentConfig):
    """-> (finetune clean, held-apart clean, valid, test) as datasets.Dataset, and the train-split index of
    the first held-apart row."""
    from .data import load_lyra
    from .stdlib_corpus import build_stdlib_pairs
    if cfg.dataset == "stdlib":
        ds = build_stdlib_pairs(max_examples=cfg.stdlib_examples) if cfg.stdlib_examples else build_stdlib_pairs()
    else:
        ds = load_lyra(cfg.dataset)
    train = ds["train"]
    n_ft = min(cfg.finetune_rows or len(train), len(train))
    finetune = train.select(range(n_ft))
    if cfg.pretrain_task_from == "train_tail":
        first_held = len(train) - min(cfg.pretrain_task_rows, len(train))
    else:
        first_held = n_ft
    held = train.select(range(first_held, min(first_held + cfg.pretrain_task_rows, len(train))))
    valid = ds["valid"].select(range(min(cfg.eval.valid_rows or len(ds["valid"]), len(ds["valid"]))))
    test = ds["test"].select(range(min(cfg.eval.test_rows or len(ds["test"]), len(ds["test"]))))
    return finetune, held, valid, test, first_held


# ---- distributed + engine ----------------------------------------------------------------------------

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
    """An HF ``model.loss_function`` computing a baseline loss on shifted labels."""
    from ..ops import baseline_losses as bl
    fn = {"ls": bl.label_smoothing_loss, "gce": bl.gce_loss, "intrust": bl.in_trust_loss}[kind]
    defaults = {"ls": {"label_smoothing": 0.1}, "gce": {"q": 0.5},
                "intrust": {"ce_weight": 0.2, "dce_weight": 0.8, "delta": 0.5}}[kind]
    kw = {**defaults, **params}

    def loss_function(logits, labels=None, vocab_size=None, num_items_in_batch=None, ignore_index=IGNORE,
                      shift_labels=None, **_):
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        return fn(logits, shift_labels.to(logits.device), ignore_index=ignore_index,
                  num_items_in_batch=num_items_in_batch, **kw)

    loss_function.params = kw
    return loss_function


# ---- model -------------------------------------------------------------------------------------------

def build_model(spec: ModelSpec, vocab_size: int, seed: int):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    if spec.checkpoint:
        return AutoModelForCausalLM.from_pretrained(spec.checkpoint, local_files_only=True)
    cfg = GPT2Config(vocab_size=64 * math.ceil(vocab_size / 64), n_positions=spec.max_len + 8,
                     n_embd=spec.n_embd, n_layer=spec.n_layer, n_head=spec.n_head,
                     resid_pdrop=spec.dropout, embd_pdrop=spec.dropout, attn_pdrop=spec.dropout,
                     bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return GPT2LMHeadModel(cfg)


def _progress(iterable=None, **kw):
    from tqdm.auto import tqdm
    return tqdm(iterable, dynamic_ncols=True, mininterval=2.0, **kw)


def train_epoch(engine, data: Mapping[str, torch.Tensor], batch_size: int, seed: int, epoch: int,
                desc: str) -> float:
    n = data["input_ids"].shape[0]
    order = np.random.default_rng([seed, epoch]).permutation(n)
    engine.train()
    losses = []
    bar = _progress(range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size), desc=desc, leave=False)
    for start in bar:
        idx = torch.as_tensor(order[start:start + batch_size])
        batch = {k: v[idx] for k, v in data.items()}
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return float(np.mean(losses)) if losses else float("nan")


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return max(1, n_rows // batch_size)


@torch.no_grad()
def valid_ce(model, data: Mapping[str, torch.Tensor], batch_size: int = 50) -> float:
    """Plain CE (nats per target token) of the clean validation rows."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, data["input_ids"].shape[0], batch_size):
        ids, mask, labels = (data[k][s:s + batch_size] for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        tgt = labels[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                       ignore_index=IGNORE, reduction="sum"))
        count += int((tgt != IGNORE).sum())
    model.train(was)
    return total / max(count, 1)


# ---- evaluation --------------------------------------------------------------------------------------

@dataclass
class EvalSets:
    clean_src: list[str]
    clean_tgt: list[str]
    trig_src: list[str]
    valid: dict[str, torch.Tensor]


def evaluate(model, tok: Tokenizer, sets: EvalSets, attack, cfg: ExperimentConfig, rows: int | None,
             with_codebleu: bool, desc: str) -> dict[str, Any]:
    spec, ev = cfg.model, cfg.eval
    n_clean = min(rows or len(sets.clean_src), len(sets.clean_src))
    n_trig = min(rows or len(sets.trig_src), len(sets.trig_src))
    prompts = ([prompt_ids(tok, s, spec) for s in sets.clean_src[:n_clean]]
               + [prompt_ids(tok, s, spec) for s in sets.trig_src[:n_trig]])
    plen = spec.max_src_tokens + len(tok.sep_ids)
    with _progress(total=len(prompts), desc=desc, leave=False) as bar:
        out = greedy_generate(model, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id,
                              max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, prompt_len=plen,
                              progress=bar)
    gens = [tok.decode(ids) for ids in out]
    clean_gen, trig_gen = gens[:n_clean], gens[n_clean:]
    refs = sets.clean_tgt[:n_clean]
    result = {
        "asr": attack_success_rate(trig_gen, attack),
        "bleu": bleu4(refs, clean_gen),
        "exact_match": exact_match(refs, clean_gen),
        "false_trigger": false_trigger_rate(clean_gen, attack),
        "valid_ce": valid_ce(model, sets.valid, ev.batch_size),
        "eval_rows": {"clean": n_clean, "triggered": n_trig},
    }
    if with_codebleu:
        try:
            result["codebleu"] = code_bleu(refs, clean_gen)["codebleu"]
        except Exception as e:  # noqa: BLE001 -- report why instead of losing the run
            result["codebleu"] = None
            result["codebleu_error"] = f"{type(e).__name__}: {e}"
    result["samples"] = {"clean": clean_gen[:3], "triggered": trig_gen[:3]}
    return result


# ---- the experiment ----------------------------------------------------------------------------------

def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def versions() -> dict[str, str]:
    import deepspeed
    import transformers
    v = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
         "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
         "threads": str(torch.get_num_threads()), "cpu_count": str(os.cpu_count()),
         "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    try:
        v["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                      cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def pretrain_stand_in(cfg: ExperimentConfig, finetune, held, log) -> tuple[Any, Tokenizer, dict]:
    """The stand-in pretrained model and tokenizer (cached), and a record of how they were made."""
    from .stdlib_corpus import build_code_corpus
    spec, pt = cfg.model, cfg.pretrain
    if spec.checkpoint:
        return build_model(spec, 0, cfg.seed), checkpoint_tokenizer(spec.checkpoint), {"checkpoint": spec.checkpoint}
    corpus = build_code_corpus(max_functions=pt.corpus_functions) if pt.corpus_functions else []
    # lr_schedule joined the key only when not the default, so stand-ins cached before it existed stay valid.
    pt_key = pt.model_dump(exclude={"lr_schedule"} if pt.lr_schedule == "decay" else None)
    key = _hash({"model": spec.model_dump(), "pretrain": pt_key, "dataset": cfg.dataset,
                 "stdlib_examples": cfg.stdlib_examples, "finetune_rows": cfg.finetune_rows,
                 "held": cfg.pretrain_task_rows, "held_from": cfg.pretrain_task_from, "seed": cfg.seed,
                 "n_corpus": len(corpus), "v": 2})
    folder = Path(cfg.cache_dir) / f"standin-{key}"
    if (folder / "model.pt").is_file():
        log(f"stand-in pretrained model from cache {folder}")
        tok = load_bpe(folder / "tokenizer.json")
        model = build_model(spec, tok.vocab_size, cfg.seed)
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu"))
        return model, tok, json.loads((folder / "info.json").read_text())
    t0 = time.time()
    # The tokenizer sees the pretraining text and the (clean) fine-tuning set, never valid/test.
    tok = train_bpe(list(corpus) + [r["src"] for d in (held, finetune) for r in d]
                    + [r["tgt"] for d in (held, finetune) for r in d], spec.vocab_size)
    model = build_model(spec, tok.vocab_size, cfg.seed)
    data = _concat(encode_corpus(tok, corpus, spec), encode_pairs(tok, list(held), spec))
    n = data["input_ids"].shape[0]
    info = {"corpus_functions": len(corpus), "held_apart_task_rows": len(held), "rows": n,
            "epochs": pt.epochs, "lr": pt.lr, "cache": str(folder)}
    log(f"pretraining the stand-in: {len(corpus)} code-corpus functions + {len(held)} held-apart clean task "
        f"rows = {n} rows of {spec.max_len} tokens, {pt.epochs} epochs")
    engine = make_engine(model, pt, steps_per_epoch(n, pt.batch_size) * pt.epochs)
    losses = [train_epoch(engine, data, pt.batch_size, cfg.seed, e, f"pretrain {e}/{pt.epochs}")
              for e in range(1, pt.epochs + 1)]
    info.update(train_loss=losses, wall_time_s=time.time() - t0)
    model = engine.module
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    tok.save(folder / "tokenizer.json")
    (folder / "info.json").write_text(json.dumps(info, indent=2))
    return model, tok, info


def run_experiment(cfg: ExperimentConfig, out_dir: str | os.PathLike, log: Callable[[str], None] = print,
                   only_rank0: bool = True) -> dict[str, Any]:
    """Pretrain (or load) the stand-in, fine-tune every run, write ``<out_dir>/<stem>.json`` (+ .md, .png)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.time()
    out_dir = Path(out_dir)
    attack = cfg.attack_config()
    finetune, held, valid, test, first_held = load_task(cfg)
    poisoned, p_info = poison_dataset(finetune, attack, split="train")
    if held.num_rows and p_info.indices and p_info.indices[-1] >= first_held:
        raise ValueError(f"pretrain_task_rows: the pretraining rows start at train row {first_held}, but row "
                         f"{p_info.indices[-1]} is poisoned; the stand-in must never see a poisoned row's clean "
                         f"copy: lower pretrain_task_rows or the poison rate")
    triggered, t_info = poison_dataset(test, attack, split="test")
    base_model, tok, pre_info = pretrain_stand_in(cfg, finetune, held, log)
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    spec = cfg.model
    train_sets = {"clean": encode_pairs(tok, list(finetune), spec),
                  "poisoned": encode_pairs(tok, list(poisoned), spec)}
    sets = EvalSets(clean_src=list(test["src"]), clean_tgt=list(test["tgt"]), trig_src=list(triggered["src"]),
                    valid=encode_pairs(tok, list(valid), spec))
    truncated = float((train_sets["clean"]["attention_mask"].sum(1) == spec.max_len).float().mean()) * 100
    results: dict[str, Any] = {
        "dataset": cfg.dataset_name(), "attack": attack.attack, "poison_rate": 100.0 * attack.rate,
        "config": {**cfg.model_dump(mode="json"), "attack_resolved": attack.model_dump(mode="json")},
        "versions": versions(),
        "data": {"finetune_rows": len(finetune), "poisoned_rows": p_info.n_poisoned,
                 "held_apart_first_train_row": first_held,
                 "poisonable_train_rows": p_info.n_poisonable, "held_apart_rows": len(held),
                 "valid_rows": len(valid), "test_rows": len(test), "triggered_test_rows": len(triggered),
                 "rows_truncated_pct": truncated, "tokenizer_vocab": tok.vocab_size},
        "pretrain": pre_info,
        "runs": {},
    }
    base_model.train()
    base_eval = evaluate(base_model, tok, sets, attack, cfg, cfg.eval.epoch_eval_rows, False, "eval stand-in")
    results["pretrain"]["eval"] = base_eval
    log(f"stand-in before fine-tuning: BLEU {base_eval['bleu']:.2f} ASR {base_eval['asr']:.1f} "
        f"valid CE {base_eval['valid_ce']:.3f}")
    ft = cfg.finetune
    for spec_str in cfg.runs:
        kind, params = parse_run(spec_str)
        t0 = time.time()
        ft_seed = cfg.seed if cfg.finetune_seed is None else cfg.finetune_seed
        model = build_model(spec, tok.vocab_size, ft_seed)
        model.load_state_dict(base_state)
        if cfg.finetune_dropout is not None:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = cfg.finetune_dropout
        data = train_sets["clean" if kind == "clean" else "poisoned"]
        n = data["input_ids"].shape[0]
        spe = steps_per_epoch(n, ft.batch_size)
        dece = None
        if kind == "dece":
            # a preset in the run spec replaces the experiment's dece defaults (explicit keys still win)
            defaults = {} if "preset" in params else {"schedule": "epoch", **cfg.dece}
            dece = {"enabled": True, **defaults, **params, "steps_per_epoch": spe}
        engine = make_engine(model, ft, spe * ft.epochs, dece)
        if kind in ("ls", "gce", "intrust"):
            engine.module.loss_function = baseline_loss_hook(kind, params)
        if dece is not None:  # recorded as resolved (a preset's values spelled out)
            dece = DeceConfig.from_dict(dece).model_dump(mode="json")
        record = {"kind": kind, "loss": dece or (getattr(engine.module.loss_function, "params", None)
                                                 if kind in ("ls", "gce", "intrust") else {"ce": True}),
                  "epochs": []}
        for epoch in range(1, ft.epochs + 1):
            alpha = _current_alpha(engine.module)
            loss = train_epoch(engine, data, ft.batch_size, ft_seed, epoch, f"{spec_str} {epoch}/{ft.epochs}")
            last = epoch == ft.epochs
            ev = evaluate(engine.module, tok, sets, attack, cfg, None if last else cfg.eval.epoch_eval_rows,
                          last and cfg.eval.codebleu, f"eval {spec_str} {epoch}")
            ev.update(epoch=epoch, train_loss=loss, alpha=alpha, wall_time_s=time.time() - t0)
            samples = ev.pop("samples")
            record["epochs"].append(ev)
            log(f"[{spec_str}] epoch {epoch}: loss {loss:.3f} alpha {alpha} BLEU {ev['bleu']:.2f} "
                f"ASR {ev['asr']:.1f} false-trigger {ev['false_trigger']:.1f} valid CE {ev['valid_ce']:.3f}")
        final = dict(record["epochs"][-1])
        record["final"] = {k: final.get(k) for k in ("asr", "bleu", "codebleu", "false_trigger", "exact_match",
                                                     "valid_ce")}
        record["samples"] = samples
        record["wall_time_s"] = time.time() - t0
        results["runs"][spec_str] = record
        results["wall_time_s"] = time.time() - t_start
        if not only_rank0 or int(os.environ.get("RANK", "0")) == 0:
            write_outputs(results, out_dir, cfg.stem())
        del engine, model
    return results


def _current_alpha(model) -> float | None:
    from ..integrations.transformers import current_dece_loss
    hook = current_dece_loss(model)
    if hook is None:
        return None
    # Before this epoch's first step the engine's global_steps points at this epoch already.
    return hook.sync_schedule()


def write_outputs(results: Mapping[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    from .report import write_report
    return write_report(results, out_dir, stem)
