"""The progress bar of the backdoor experiment's training epochs and decoding (tqdm, refreshed every 2 s)."""

from __future__ import annotations


def progress(iterable=None, **kw):
    from tqdm.auto import tqdm
    return tqdm(iterable, dynamic_ncols=True, mininterval=2.0, **kw)
