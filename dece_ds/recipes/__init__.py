"""Training recipes: data -> engine -> step loop -> log -> checkpoint/resume, shared by the launchers.

``launch/train.py`` (fine-tuning) and ``launch/continue_pretraining.py`` parse their flags and call
``recipes.finetune.run`` / ``recipes.pretrain.run``; both drive the same step loop
(``recipes.loop.train_steps``), checkpoint rules (``recipes.checkpoint``) and run log
(``recipes.run_log``). Batches go to the engine's device; the loop's collectives run on the
accelerator's device, so the same code runs on CPU ranks (gloo) and GPUs (NCCL).
"""
