"""Post hoc: ``dece-ds audit --model DIR --data FILE`` scores a saved HF model's rows with one forward pass
(no training-time record), and names a bad model folder or a missing column in one line."""

from __future__ import annotations

import json

import torch

from dece_ds.cli import main as cli_main
from tests.integrations import write_prompt_completion_data


def _saved_model(path):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from dece_ds.data.tokenizer import train_bpe_tokenizer
    texts = [json.loads(x)["src"] + "\n" + json.loads(x)["tgt"] for x in open(path.parent / "train.jsonl")]
    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe_tokenizer(texts, 300, ["<eos>", "<pad>"]),
                                  eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_post_hoc_scores_every_row(tmp_path, capsys):
    data = write_prompt_completion_data(tmp_path / "train.jsonl", n=12)
    _saved_model(tmp_path / "model")
    out = tmp_path / "audit"
    assert cli_main(["audit", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(out),
                     "--seq-len", "96", "--alpha", "0.9"]) == 0
    rows = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in rows) == list(range(12))
    assert all(r["instruction"].startswith("select ") for r in rows)
    assert json.loads((out / "audit_summary.json").read_text())["score"] == "trigger"


def test_post_hoc_errors(tmp_path, capsys):
    data = write_prompt_completion_data(tmp_path / "train.jsonl", n=4)
    assert cli_main(["audit", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "not a local HF model folder" in capsys.readouterr().err
    _saved_model(tmp_path / "model")
    assert cli_main(["audit", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "o"),
                     "--prompt-field", "question"]) == 2
    assert "no column 'question'" in capsys.readouterr().err
