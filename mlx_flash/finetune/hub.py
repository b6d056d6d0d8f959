"""Models named by a Hugging Face repo id: fetched with bounded waits, or found in the cache.

mlx-lm downloads a repo id with ``huggingface_hub.snapshot_download``, whose
first request (the repo's file list) has no timeout: on a network that
accepts connections and never answers it waits forever, printing nothing.
Here that question is asked first, with a timeout (``HF_HUB_ETAG_TIMEOUT``
seconds, huggingface_hub's own setting, default 10); the files then download
with huggingface_hub's timeouts (``HF_HUB_ETAG_TIMEOUT``,
``HF_HUB_DOWNLOAD_TIMEOUT``). If the hub cannot be reached, a copy in the
Hugging Face cache is used; without one the run stops with one line naming
the model, the cache and how to pass a local folder instead.
"""

import sys
from pathlib import Path
from typing import Optional

from ..text import first_line
from .config import RecipeError


def _cached(model: str) -> Optional[str]:
    """The folder of ``model`` in the Hugging Face cache, or None without a whole copy."""
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        return snapshot_download(model, local_files_only=True, allow_patterns=DEFAULT_ALLOW_PATTERNS)
    except Exception:  # noqa: BLE001 - not in the cache, or only part of it
        return None


def _ask(model: str) -> None:
    """Ask the hub about ``model``, waiting at most ``HF_HUB_ETAG_TIMEOUT`` seconds."""
    from huggingface_hub import HfApi, constants

    HfApi().repo_info(model, timeout=constants.HF_HUB_ETAG_TIMEOUT)


def availability(model: str) -> str:
    """Where a run would find ``model`` (a repo id), in one line, for ``--check``.

    Asks the hub with the same bounded wait a run uses. Raises ``RecipeError``
    when the model is neither in the Hugging Face cache nor fetchable now:
    the run would stop while loading it.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    endpoint, cache = constants.ENDPOINT, constants.HF_HUB_CACHE
    cached = _cached(model)
    if cached:
        return f"model {model}: in the Hugging Face cache ({cached}); nothing to download"
    if constants.HF_HUB_OFFLINE:
        raise RecipeError(f"model: {model} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is on")
    try:
        _ask(model)
    except GatedRepoError:
        raise RecipeError(f"model: {model} is gated on {endpoint}: accept its terms there and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise RecipeError(f"model: no model {model} on {endpoint} (or it is private: log in with hf auth login)") from None
    except Exception as e:  # noqa: BLE001 - timeouts, refused connections, DNS: the network
        raise RecipeError(
            f"model: {model} is not in the Hugging Face cache ({cache}) and cannot be fetched from {endpoint} now "
            f"({first_line(e)}); connect once to download it, or give a local mlx-lm model folder: --set model=/path"
        ) from None
    return f"model {model}: not in the Hugging Face cache; the run downloads it from {endpoint} into {cache} first"


def local_path(model: str) -> str:
    """A local folder holding ``model``: the folder itself, or the hub copy."""
    if Path(model).is_dir():
        return model
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    endpoint, cache = constants.ENDPOINT, constants.HF_HUB_CACHE
    why = "offline mode (HF_HUB_OFFLINE) is on"
    if not constants.HF_HUB_OFFLINE:
        print(f"model {model}: fetching from {endpoint} into {cache}", file=sys.stderr, flush=True)
        try:
            HfApi().repo_info(model, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except GatedRepoError:
            raise RecipeError(f"model: {model} is gated on {endpoint}: accept its terms there and log in (hf auth login)") from None
        except RepositoryNotFoundError:
            raise RecipeError(
                f"model: no model {model} on {endpoint} (or it is private: log in with hf auth login)"
            ) from None
        except Exception as e:  # noqa: BLE001 - timeouts, refused connections, DNS: the network
            why = f"no answer within {constants.HF_HUB_ETAG_TIMEOUT} s (HF_HUB_ETAG_TIMEOUT)"
            if "timeout" not in type(e).__name__.lower() and "timed out" not in str(e).lower():
                why = first_line(e)
        else:
            try:
                return snapshot_download(model, allow_patterns=DEFAULT_ALLOW_PATTERNS)
            except Exception as e:  # noqa: BLE001 - a download that fails half-way
                why = first_line(e)
    try:
        cached = snapshot_download(model, local_files_only=True, allow_patterns=DEFAULT_ALLOW_PATTERNS)
    except Exception:  # noqa: BLE001 - not in the cache, or only part of it
        raise RecipeError(
            f"model: cannot fetch {model} from {endpoint} ({why}) and the Hugging Face cache ({cache}) has no "
            f"copy; connect once to download it, or give a local mlx-lm model folder: --set model=/path/to/model"
        ) from None
    print(f"model {model}: {why}; using the copy in the Hugging Face cache, {cached}", file=sys.stderr)
    return cached
