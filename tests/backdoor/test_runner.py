"""The backdoor experiment end to end on a tiny model (two epochs, a few dozen rows), plus its parts:
run specs, batched greedy decoding (= one row at a time), the report, the ``dece-ds backdoor`` CLI."""

import json

import pytest
import torch

from dece_ds.backdoor.generate import greedy_generate
from dece_ds.backdoor.report import column_name, combined_table, markdown_report, merge_results
from dece_ds.backdoor.runner import ExperimentConfig, parse_run, run_experiment

pytestmark = pytest.mark.timeout(120)


def tiny_config(tmp_path, **over) -> ExperimentConfig:
    cfg = {
        "dataset": "stdlib",
        "stdlib_examples": 150,
        "attack": {"attack": "badpre", "rate": 0.1},
        "finetune_rows": 40,
        "runs": ["clean", "ce", "dece", "gce"],
        "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 512, "max_len": 80, "max_src_tokens": 24},
        "pretrain": {"corpus_functions": 30, "epochs": 1, "batch_size": 8},
        "finetune": {"epochs": 2, "batch_size": 8, "lr": 1e-3},
        "eval": {"max_new_tokens": 16, "epoch_eval_rows": 6, "test_rows": 10, "batch_size": 8},
        "threads": 1,
        "cache_dir": str(tmp_path / "cache"),
        "name": "tiny",
    }
    cfg.update(over)
    return ExperimentConfig.model_validate(cfg)


@pytest.mark.timeout(400)
def test_tiny_end_to_end_writes_the_report(tmp_path):
    cfg = tiny_config(tmp_path)
    run_experiment(cfg, tmp_path / "out", log=lambda *_: None)
    for ext in ("json", "md", "png"):
        assert (tmp_path / "out" / f"tiny.{ext}").is_file(), ext
    saved = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert saved["dataset"] == "stdlib" and saved["attack"] == "badpre" and saved["poison_rate"] == 10.0
    assert set(saved["runs"]) == {"clean", "ce", "dece", "gce"}
    assert saved["data"]["poisoned_rows"] == 4 and saved["data"]["finetune_rows"] == 40
    for spec, run in saved["runs"].items():
        assert set(run["final"]) >= {"asr", "bleu", "codebleu", "false_trigger", "valid_ce"}, spec
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        for e in run["epochs"]:
            assert {"asr", "bleu", "valid_ce", "false_trigger", "exact_match"} <= set(e)
            assert 0.0 <= e["asr"] <= 100.0 and e["valid_ce"] > 0
        assert run["epochs"][0]["eval_rows"]["clean"] == 6     # per-epoch subset ...
        assert run["epochs"][1]["eval_rows"]["clean"] == 10    # ... the last epoch on all test rows
        assert run["final"]["codebleu"] is not None
    # DeCE ran through dece_ds.initialize with alpha = 0.99 ** epoch.
    assert saved["runs"]["dece"]["loss"]["alpha_base"] == 0.99
    assert [e["alpha"] for e in saved["runs"]["dece"]["epochs"]] == pytest.approx([0.99, 0.99 ** 2])
    assert saved["runs"]["gce"]["loss"] == {"q": 0.5}
    # Same pretrained weights and batch order: clean and ce differ only by the poisoned rows.
    assert saved["pretrain"]["rows"] > 0
    md = (tmp_path / "out" / "tiny.md").read_text()
    assert "CE on poisoned data" in md and "DeCE on poisoned data" in md and "GCE" in md
    # A second run with another fine-tuning seed reuses the cached stand-in, but not the batch order;
    # a preset in a run spec replaces the experiment's dece defaults.
    again = run_experiment(tiny_config(tmp_path, runs=["ce", "dece:preset=backdoor_guard"], name="tiny2",
                                       finetune_seed=1), tmp_path / "out", log=lambda *_: None)
    assert again["pretrain"]["cache"] == saved["pretrain"]["cache"]
    assert again["runs"]["ce"]["epochs"][0]["train_loss"] != saved["runs"]["ce"]["epochs"][0]["train_loss"]
    guard = again["runs"]["dece:preset=backdoor_guard"]
    assert guard["loss"]["alpha_base"] == 0.97
    assert [e["alpha"] for e in guard["epochs"]] == pytest.approx([0.97, 0.97 ** 2])


def test_parse_run_specs():
    assert parse_run("dece") == ("dece", {})
    assert parse_run("dece:alpha_base=0.95,ce_warmup_epochs=2") == ("dece", {"alpha_base": 0.95,
                                                                          "ce_warmup_epochs": 2})
    with pytest.raises(ValueError, match="kind must be one of"):
        parse_run("mse")
    with pytest.raises(ValueError, match="key=value"):
        parse_run("gce:q")


def test_batched_greedy_equals_one_row_at_a_time():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [3, 4, 5, 6, 7]]
    batched = greedy_generate(model, prompts, eos_id=0, pad_id=1, max_new_tokens=12, batch_size=4, prompt_len=8)
    alone = [greedy_generate(model, [p], eos_id=0, pad_id=1, max_new_tokens=12, prompt_len=len(p))[0]
             for p in prompts]
    assert batched == alone
    # and equal to plain argmax decoding without a cache
    ids = torch.tensor([prompts[1]])
    for _ in range(12):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    full = ids[0, len(prompts[1]):].tolist()
    assert alone[1] == (full[:full.index(0)] if 0 in full else full)


def test_report_table_layout():
    res = {"dataset": "lyra", "attack": "badpre", "poison_rate": 5.0, "data": {},
           "runs": {"clean": {"final": {"bleu": 50.0, "codebleu": 60.0, "asr": 0.0, "false_trigger": 0.0},
                              "epochs": [{"epoch": 1, "asr": 0.0, "bleu": 50.0}]},
                    "dece:alpha_base=0.95": {"final": {"bleu": 49.0, "codebleu": None, "asr": 1.2,
                                                       "false_trigger": 0.0}, "epochs": []}}}
    table = combined_table([res])
    assert "badpre 5%: BLEU / CodeBLEU / ASR" in table
    assert "| clean model | 50.00 / 60.00 / 0.0 |" in table
    assert "| DeCE on poisoned data (alpha_base=0.95) | 49.00 / n/a / 1.2 |" in table
    assert "Per epoch" in markdown_report(res)


def test_report_column_names_the_trigger_count():
    base = {"dataset": "lyra", "attack": "badpre", "poison_rate": 2.0, "runs": {}}
    assert column_name(base) == "badpre 2%"
    assert column_name({**base, "config": {"attack": {"attack": "badpre", "n_insertions": 1}}}) == "badpre 2%"
    assert column_name({**base, "config": {"attack": {"attack": "badpre", "n_insertions": 3}}}) == "badpre x3 2%"


def test_combined_table_puts_rows_in_the_paper_order():
    final = {"bleu": 1.0, "codebleu": 1.0, "asr": 0.0, "false_trigger": 0.0}
    a = {"dataset": "lyra", "attack": "badpre", "poison_rate": 1.0,
         "runs": {"gce": {"final": final}, "dece:alpha_base=0.97": {"final": final}, "ce": {"final": final}}}
    b = {**a, "poison_rate": 10.0, "runs": {"clean": {"final": final}, "dece": {"final": final}}}
    rows = [line.split(" | ")[0] for line in combined_table([a, b]).splitlines()[2:]]
    assert rows == ["| clean model", "| CE on poisoned data", "| DeCE on poisoned data (alpha_base=0.97)",
                    "| DeCE on poisoned data", "| GCE (q=0.5)"]


def test_merge_refuses_a_different_trigger_count():
    one = {"dataset": "lyra", "attack": "badpre", "poison_rate": 10.0, "runs": {"ce": {}},
           "config": {"attack": {"attack": "badpre", "n_insertions": 1}}}
    three = {**one, "runs": {"dece": {}}, "config": {"attack": {"attack": "badpre", "n_insertions": 3}}}
    with pytest.raises(ValueError, match="badpre x3 10%"):
        merge_results([one, three])
    assert list(merge_results([three, {**three, "runs": {"ce": {}}}])["runs"]) == ["dece", "ce"]


def test_cli_registers_backdoor(capsys):
    from dece_ds.cli import main
    assert main(["backdoor", "run", "--dataset", "stdlib", "--rate", "2", "--runs", "ce,dece:alpha_base=0.9,"
                 "ce_warmup_epochs=2,gce", "--epochs", "3", "--max-src-tokens", "96", "--max-len", "192",
                 "--finetune-seed", "3", "--lr-schedule", "constant", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["attack"]["rate"] == 0.02
    assert cfg["runs"] == ["ce", "dece:alpha_base=0.9,ce_warmup_epochs=2", "gce"]
    assert cfg["finetune"]["epochs"] == 3
    assert (cfg["model"]["max_src_tokens"], cfg["model"]["max_len"]) == (96, 192)
    assert (cfg["finetune_seed"], cfg["finetune"]["lr_schedule"]) == (3, "constant")


def test_cli_n_insertions_reaches_the_attack_and_a_bad_attack_field_is_named(capsys):
    from dece_ds.cli import main
    assert main(["backdoor", "run", "--rate", "10", "--n-insertions", "3", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["attack"] == {"attack": "badpre", "rate": 0.1, "n_insertions": 3}
    assert main(["backdoor", "run", "--attack", "grammar", "--n-insertions", "3", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "attack.grammar.n_insertions" in err and "Extra inputs are not permitted" in err


def _lyra_folder(tmp_path, n_train=20):
    """A Lyra-layout folder whose train rows say their own index (row i: src 'task i', an SQL tgt)."""
    import csv
    folder = tmp_path / "lyra"
    folder.mkdir()
    for split, n in (("train", n_train), ("valid", 4), ("test", 4)):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["src", "tgt"])
            for i in range(n):
                w.writerow([f"task {i} of {split}",
                            f'def f ( conn ) :\n\t return conn . execute ( " select * from t where id = {i} " )'])
    return folder


def test_pretraining_rows_after_the_finetuning_rows_or_from_the_train_tail(tmp_path):
    from dece_ds.backdoor.runner import load_task
    folder = _lyra_folder(tmp_path)
    after = tiny_config(tmp_path, dataset=str(folder), finetune_rows=12, pretrain_task_rows=5)
    ft, held, *_, first_held = load_task(after)
    assert [r.split()[1] for r in ft["src"]] == [str(i) for i in range(12)]
    assert [r.split()[1] for r in held["src"]] == ["12", "13", "14", "15", "16"] and first_held == 12
    tail = tiny_config(tmp_path, dataset=str(folder), finetune_rows=None, pretrain_task_rows=5,
                       pretrain_task_from="train_tail")
    ft, held, *_, first_held = load_task(tail)
    assert ft.num_rows == 20                                  # fine-tunes on the whole split ...
    assert [r.split()[1] for r in held["src"]] == ["15", "16", "17", "18", "19"] and first_held == 15


def test_a_poisoned_row_inside_the_pretraining_rows_is_refused(tmp_path):
    folder = _lyra_folder(tmp_path)
    # 50 % of 20 rows: rows 0..9 poisoned, but the stand-in would pretrain on rows 8..19 clean
    cfg = tiny_config(tmp_path, dataset=str(folder), finetune_rows=None, pretrain_task_rows=12,
                      pretrain_task_from="train_tail", attack={"attack": "badpre", "rate": 0.5})
    with pytest.raises(ValueError, match="pretrain_task_rows: .* row 9 is poisoned"):
        run_experiment(cfg, tmp_path / "out", log=lambda *_: None)


@pytest.mark.parametrize("schedule", ["decay", "constant"])
def test_finetune_lr_schedule_after_the_warm_up(schedule):
    """lr per step through the real engine: linear warm-up over 10 % of the steps, then linear decay to 0
    at the last step ('decay') or held at lr ('constant')."""
    from dece_ds.backdoor.runner import StageSpec, make_engine
    stage = StageSpec(lr=1e-2, batch_size=2, warmup_frac=0.1, lr_schedule=schedule)
    total, warm = 40, 4
    engine = make_engine(torch.nn.Linear(3, 1), stage, total_steps=total)
    seen = []
    for _ in range(total):
        loss = engine(torch.ones(2, 3)).sum()
        engine.backward(loss)
        engine.step()
        seen.append(engine.get_lr()[0])
    assert seen[warm] == pytest.approx(1e-2)
    if schedule == "constant":
        assert seen[-1] == pytest.approx(1e-2)
    else:
        assert seen[warm + (total - warm) // 2] == pytest.approx(1e-2 * 0.5, rel=0.1)
        assert seen[-1] == pytest.approx(1e-2 / (total - warm))  # one step before 0


@pytest.mark.parametrize("name", ["../../x", "..", "a/b", "/abs", "a\\b", "", "   ", ".hidden", "x\0y"])
def test_experiment_name_must_stay_inside_out(tmp_path, name):
    from pydantic import ValidationError
    with pytest.raises(ValidationError) as e:
        tiny_config(tmp_path, name=name)
    (err,) = e.value.errors()
    assert err["loc"] == ("name",) and "must be a plain file name inside the output folder" in err["msg"]
    assert repr(name) in err["msg"]


@pytest.mark.parametrize("name", ["tiny", "lyra-badpre-10-C-x3", "a..b", "run_1.v2", None])
def test_plain_experiment_names_still_pass(tmp_path, name):
    assert tiny_config(tmp_path, name=name).name == name
