"""The hub's exceptions, and the translation of huggingface_hub failures into one-line errors."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{6,}")


class ModelCardError(ValueError):
    """A model card whose metadata cannot be read. The message names the field and how to fix it."""


class UnsafeWeightsError(ValueError):
    """Pickle weights were refused: unpickling can run arbitrary code. Loading them needs an explicit opt-in."""


class HubAccessError(OSError):
    """The Hub could not be used (offline, no token, no such repo, no network). The message says what to do."""


class IncompleteResultsWarning(UserWarning):
    """A card whose ``model-index`` lacks rows that its ``hf_cd`` block says were measured."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures: the HTTP client's transport errors (httpx2 for huggingface_hub 2.x, httpx for 1.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _redact(text: str, token: str | None) -> str:
    """Remove the caller's token and anything shaped like a Hugging Face token from a message."""
    if token and isinstance(token, str):
        text = text.replace(token, "<token>")
    return _TOKEN_PATTERN.sub("hf_***", text)


@contextmanager
def hub_errors(action: str, token: str | None, offline_hint: str) -> Iterator[None]:
    """Turn huggingface_hub's failures into one-line `HubAccessError`s that say what to do.

    The original exception is dropped (``from None``) so that no upstream text (headers, URLs) can
    leak a token into a traceback. The message names the cause instead.
    """
    try:
        yield
    except LocalTokenNotFoundError:
        message = f"Cannot {action}: no Hugging Face token found. Run `hf auth login`, set HF_TOKEN, or pass token=."
    except OfflineModeIsEnabled:
        message = (
            f"Cannot {action}: HF_HUB_OFFLINE=1 is set. Unset HF_HUB_OFFLINE once online, or {offline_hint}."
        )
    except GatedRepoError:
        message = f"Cannot {action}: the repository is gated. Request access on its Hub page, then retry."
    except RepositoryNotFoundError:
        message = (
            f"Cannot {action}: no such repository, or your token cannot see it (RepositoryNotFoundError). Check the "
            "name, and that you are logged in (`hf auth whoami`) as an account with access."
        )
    except RevisionNotFoundError:
        message = f"Cannot {action}: that revision (branch, tag or commit) does not exist; check revision=."
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub is unreachable"
        message = f"Cannot {action}: it is not in the local cache and {reason}. {offline_hint[0].upper()}{offline_hint[1:]}."
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            message = f"Cannot {action}: the Hub rejected the token (401). Log in again with `hf auth login` or pass a valid token=."
        elif status == 403:
            message = f"Cannot {action}: the token is not allowed to (403). Use a token with write access to that namespace, or with access to the repository."
        else:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            message = f"Cannot {action}: the Hub answered {status or 'with an error'} ({first_line})."
    except _transport_errors() as error:
        message = (
            f"Cannot {action}: cannot reach {constants.ENDPOINT} ({type(error).__name__}). Check the network or "
            f"proxy (HF_ENDPOINT), or {offline_hint}."
        )
    else:
        return
    raise HubAccessError(_redact(message, token)) from None


LOAD_HINT = "download it once while online (it is then cached) or pass a local directory"


def checked_repo_id(source: str | os.PathLike) -> str:
    """``source`` as a repo id, once it is known not to be a local directory (else a clear FileNotFoundError)."""
    text = os.fspath(source)
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise FileNotFoundError(
            f"{text!r} is neither an existing local directory nor a Hub repo id (user/name)."
        ) from None
    return text
