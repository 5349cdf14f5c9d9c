"""``import dece_ds`` (and importing its integration modules) patches nothing in other pipelines."""

from __future__ import annotations

import subprocess
import sys

from . import launcher_env

CHECK = r"""
import sys
import dece_ds
assert "deepspeed" not in sys.modules, "import dece_ds imported deepspeed"
assert "transformers" not in sys.modules, "import dece_ds imported transformers"

import deepspeed, transformers
import deepspeed.sequence.cross_entropy as ds_ce
import transformers.loss.loss_utils as loss_utils
from transformers import PreTrainedModel, Trainer, LlamaForCausalLM

def snapshot():
    return (PreTrainedModel.__dict__["loss_function"], dict(loss_utils.LOSS_MAPPING), loss_utils.ForCausalLMLoss,
            deepspeed.initialize, ds_ce.configure_vocab_parallel_loss, ds_ce.VocabParallelCausalLMLoss.__call__,
            Trainer.compute_loss, Trainer.__init__, LlamaForCausalLM.forward)

before = snapshot()
import dece_ds.integrations.deepspeed, dece_ds.integrations.transformers, dece_ds.parallel.vocab_shard
initialize = dece_ds.initialize
assert snapshot() == before, "importing dece_ds integrations patched something"
model = LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))
assert model.loss_function is loss_utils.ForCausalLMLoss
print("OK")
"""


def test_import_dece_ds_patches_nothing():
    proc = subprocess.run([sys.executable, "-c", CHECK], env=launcher_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
