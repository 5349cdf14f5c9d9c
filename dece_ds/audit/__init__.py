"""The poison audit: name the training rows DeCE refused to learn (docs/audit.md).

``recorder``: the training-time record (per row, per step: each trained token's ``log p_t``), written by the
DeCE hook when the ``dece`` section has ``"audit": {"enabled": true}``. ``score``: suspicion scores, the cut,
and the report (``dece-ds audit RUN_OUT``).
"""

from .recorder import (ROW_IDS_KWARG, AuditRecord, AuditRecordError, AuditRecorder, keep_steps_before,  # noqa: F401
                       read_record)
