"""HF Trainer: a ``dece_row_ids`` column (``remove_unused_columns=False``) reaches the DeCE hook, which pops it
before the model's forward; every row of every epoch is recorded under its id."""

from __future__ import annotations

from dece_ds.audit import read_record


def test_trainer_records_rows_by_their_column(tmp_path):
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from dece_ds.integrations.transformers import apply_dece_to_trainer
    from tests.integrations.test_transformers_trainer import V, _model

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (8, 16), generator=g).tolist()
    row_ids = [100 + i for i in range(8)]                      # ids of the caller's choosing
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "dece_row_ids": row_ids})
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=2, num_train_epochs=2,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = Trainer(model=_model(), args=args, train_dataset=ds)
    apply_dece_to_trainer(trainer, config={"alpha_base": 0.9, "audit": {"enabled": True, "out": str(tmp_path / "a")}})
    trainer.train()
    record = read_record(tmp_path / "a")
    assert record.rows == row_ids
    for i, r in enumerate(row_ids):
        assert sorted(record.visits[r]) == [1, 2]
        assert record.visits[r][1].tok == ids[i][1:]           # the row's own shifted labels
