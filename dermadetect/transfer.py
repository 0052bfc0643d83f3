"""How the project moves files to and from the Hugging Face Hub: over plain HTTPS, not Xet."""

from __future__ import annotations

import contextlib
import threading

from huggingface_hub import constants as hub_constants

_lock = threading.Lock()
_depth = 0  # transfers inside without_xet now, across threads
_previous = False  # the flag as it was before the first of them


@contextlib.contextmanager
def without_xet():
    """Hub transfers over plain HTTPS, the LFS path the Hub keeps for clients without hf_xet, instead of Xet:
    hf_xet fails with a RuntimeError after minutes of retries, which would defeat the short fallback to the cache,
    and this is the protocol the tests' local Hub speaks. huggingface_hub reads the flag at each transfer; it is
    set back only when the last of overlapping transfers ends, so one thread cannot turn Xet on under another."""
    global _depth, _previous
    with _lock:
        if _depth == 0:
            _previous = hub_constants.HF_HUB_DISABLE_XET
        _depth += 1
        hub_constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                hub_constants.HF_HUB_DISABLE_XET = _previous
