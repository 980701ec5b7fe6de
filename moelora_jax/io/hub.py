"""Hugging Face hub ids for ``model.path``: ``org/name`` (or ``org/name@revision``) resolved to a snapshot directory
of the hub's standard cache through ``huggingface_hub.snapshot_download``.

Only what the model needs is fetched (configs, tokenizer files, safetensors weights), never pickled weights
(``*.bin``, ``*.pt``); a repository without safetensors is refused. ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` /
``HF_HOME`` work as everywhere else in the ecosystem: offline, a snapshot already in the cache is used as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

from moelora_jax.errors import UserError, first_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
"""What :func:`snapshot` fetches of a model repository: configs, weights (safetensors only) and tokenizer files."""


def is_hub_id(source: str) -> bool:
    """Whether ``source`` reads as ``org/name[@revision]`` (a local path that exists always wins over this)."""
    return bool(_HUB_ID.match(source)) and not source.endswith((".gguf", ".json"))


def snapshot(source: str) -> Path:
    """The cached snapshot directory of the hub model ``org/name[@revision]``, downloaded first unless offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, revision = source.partition("@")
    try:
        directory = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=MODEL_FILES))
    except LocalEntryNotFoundError as e:
        raise UserError(
            f"model.path={source} is not in the Hugging Face cache and cannot be downloaded (offline, or no network): "
            "download it once with network access, or give a local directory."
        ) from e
    except (RepositoryNotFoundError, HfHubHTTPError) as e:
        raise UserError(f"model.path={source} cannot be fetched from the Hugging Face hub ({first_line(e)}).") from e
    if not any(directory.glob("*.safetensors")):
        raise UserError(
            f"model.path={source} has no safetensors weights (pickled .bin weights are never loaded): convert it, "
            "or choose a repository that publishes safetensors."
        )
    return directory
