from __future__ import annotations

import copy

import pytest

from tests.audit.toy import pretrained


@pytest.fixture(scope="session")
def stand_in():
    """The toy stand-in, pretrained once per session (about ten seconds); tests fine-tune copies of it."""
    model = pretrained()
    return lambda: copy.deepcopy(model)
