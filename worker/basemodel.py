"""Where a task's base model comes from: a local folder, the built-in tiny model, or the hub.

A spec's `base_model` is one of:

    /path/to/folder        a Hugging Face folder on this machine (an s3:// or coordinator-side
                           folder arrives here too: the coordinator stages it as an archive,
                           which worker/inputs.py unpacks into the models cache)
    cotune://tiny-llama    the built-in tiny model (worker/tinymodel.py), built on first use
                           into <cache>/tiny-llama-<version> (cache: $COTUNE_HOME/models)
    org/name               a Hugging Face hub id, loaded at its pinned revision

`resolve_base_model` turns the string into a `BaseModelSource` that `from_pretrained` takes;
`load_error` turns a failed hub load into a message a user can act on.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cotune.orchestrator.protocol.builtin_models import BUILTIN_CONFIGS, BUILTIN_SCHEME
from cotune.worker.home import default_models_dir
from cotune.worker.tinymodel import MARKER_FILE, TINY_LLAMA_NAME, build_tiny_llama

BUILTIN_MODELS = tuple(BUILTIN_CONFIGS)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class BaseModelError(ValueError):
    """The base model cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class BaseModelSource:
    """What `from_pretrained` gets: a local folder, or a hub id with its revision."""

    location: str
    revision: str | None
    local: bool

    def pretrained_kwargs(self) -> dict[str, object]:
        """Keyword arguments for `from_pretrained` (the pinned revision of a hub model)."""
        return {} if self.local or self.revision is None else {"revision": self.revision}


def resolve_base_model(
    base_model: str, revision: str | None = None, *, cache_dir: Path | None = None
) -> BaseModelSource:
    """Resolve `base_model` (see the module docstring); builds the tiny model if needed."""
    if not base_model or base_model.isspace():
        raise BaseModelError(
            "base_model is empty: give a local folder, cotune://tiny-llama or a hub id"
        )
    if base_model.startswith(BUILTIN_SCHEME):
        name = base_model.removeprefix(BUILTIN_SCHEME)
        if name not in BUILTIN_MODELS:
            raise BaseModelError(
                f"base_model {base_model!r}: unknown built-in model; known: "
                + ", ".join(BUILTIN_SCHEME + n for n in BUILTIN_MODELS)
            )
        folder = ensure_tiny_llama(cache_dir or default_models_dir())
        return BaseModelSource(str(folder), None, local=True)
    if base_model.startswith("s3://"):
        raise BaseModelError(
            f"base_model {base_model!r}: s3:// base models are staged by the coordinator; "
            "a worker needs the staged local folder"
        )
    path = Path(base_model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BaseModelError(
                f"base_model {base_model!r}: folder has no config.json (not a Hugging Face model)"
            )
        return BaseModelSource(str(path.resolve()), None, local=True)
    if base_model.startswith((".", "/", "~")) or not _HUB_ID.match(base_model):
        raise BaseModelError(
            f"base_model {base_model!r}: no such folder, and not a hub id of the form org/name"
        )
    return BaseModelSource(base_model, revision, local=False)


def load_error(source: BaseModelSource, error: Exception) -> BaseModelError:
    """A clear error for a failed `from_pretrained` (typically: no hub access)."""
    if source.local:
        return BaseModelError(f"base model folder {source.location} could not be loaded: {error}")
    rev = f" at revision {source.revision}" if source.revision else ""
    return BaseModelError(
        f"base model {source.location!r}{rev} could not be loaded from the Hugging Face hub "
        f"({type(error).__name__}: {error}). Without hub access, download it ahead of time "
        "(huggingface-cli download) and set base_model to that local folder, or use "
        "cotune://tiny-llama"
    )


def ensure_tiny_llama(cache_dir: Path) -> Path:
    """The tiny model's folder under `cache_dir`, built on first use.

    Safe under concurrency: each builder writes a private temporary folder and renames it
    into place atomically; a builder that loses the race drops its copy (same seed, same
    bytes, so either copy is the model).
    """
    final = Path(cache_dir) / TINY_LLAMA_NAME
    if (final / MARKER_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_LLAMA_NAME}-", dir=final.parent))
    try:
        build_tiny_llama(tmp / "model")
        try:
            os.rename(tmp / "model", final)
        except OSError:
            if not (final / MARKER_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
