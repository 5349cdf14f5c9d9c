"""The backdoor evaluation's training path (``dece_ds.initialize`` through ``finetune.make_engine`` and
``train_epoch``): with an audit section every row of every epoch is recorded under its fine-tuning-set index."""

from __future__ import annotations

from dece_ds.audit import read_record
from dece_ds.backdoor.experiment import StageSpec
from dece_ds.backdoor.finetune import make_engine, train_epoch
from dece_ds.integrations.transformers import current_dece_loss
from tests.audit.test_recorder import _check_rows
from tests.audit.toy import encode, make_rows


def test_train_epoch_records_every_row_through_the_engine(tmp_path, stand_in):
    data = encode(make_rows(32, {4}, 3))
    stage = StageSpec(epochs=2, lr=1e-3, batch_size=8)
    dece = {"enabled": True, "alpha_base": 0.9, "schedule": "epoch", "steps_per_epoch": 4,
            "audit": {"enabled": True, "out": str(tmp_path)}}
    engine = make_engine(stand_in(), stage, 8, dece)
    for epoch in (1, 2):
        train_epoch(engine, data, 8, seed=0, epoch=epoch, desc="t")
    current_dece_loss(engine.module).recorder.close()
    record = read_record(tmp_path)
    _check_rows(record, data, epochs=2)
    assert sorted({v.alpha for r in record.rows for v in record.visits[r].values()}) == [0.81, 0.9]
