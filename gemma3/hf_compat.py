"""Objects shaped as transformers users know them, with or without transformers installed.

- ``pretrained_config(raw)``: ``model.config``, a transformers ``Gemma3TextConfig`` /
  ``Gemma3Config`` built from config.json when transformers is installed, else a ``ConfigView``
  with the same attribute names (config.json's keys, nested ``text_config`` / ``vision_config``).
- ``generation_config(d)``: ``model.generation_config``, a transformers ``GenerationConfig`` when
  installed, else a ``ConfigView`` of generation_config.json.
- ``ModelOutput``: what ``forward`` returns; attribute, key and int access, ``keys()``,
  ``to_tuple()``, as transformers' ``ModelOutput`` (fields that are None are left out of the
  keys and of int indexing, as there).
- ``resolve_model_dir``: a local directory, or a hub id found in the local Hugging Face cache
  (offline: no network here).
"""

from __future__ import annotations

import os
from collections import OrderedDict


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


class ConfigView:
    """A config.json (or generation_config.json) as attributes; nested dicts of sub-configs
    (``text_config``, ``vision_config``) become views too. ``to_dict()`` gives the dict back."""

    def __init__(self, d: dict):
        self._d = dict(d)

    def __getattr__(self, name):
        d = self.__dict__.get("_d", {})
        if name not in d:
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r} (config keys: {sorted(d)})"
            )
        v = d[name]
        return ConfigView(v) if isinstance(v, dict) and name.endswith("_config") else v

    def __setattr__(self, name, value):
        if name == "_d":
            object.__setattr__(self, name, value)
        else:
            self._d[name] = value

    def to_dict(self) -> dict:
        return dict(self._d)

    def __repr__(self):
        return f"ConfigView({self._d!r})"


def pretrained_config(raw: dict):
    """``model.config``: transformers' class for ``raw["model_type"]`` when installed."""
    transformers = _transformers()
    if transformers is None:
        return ConfigView(raw)
    cls = {"gemma3_text": "Gemma3TextConfig", "gemma3": "Gemma3Config"}.get(raw.get("model_type"))
    if cls is None:
        return ConfigView(raw)
    d = {k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")}
    config = getattr(transformers, cls).from_dict(d)
    if "architectures" in raw:
        config.architectures = raw["architectures"]
    return config


def generation_config(d: dict):
    """``model.generation_config``: a transformers ``GenerationConfig`` when installed."""
    transformers = _transformers()
    if transformers is None:
        return ConfigView(d)
    return transformers.GenerationConfig.from_dict(dict(d))


def generation_dict(config) -> dict:
    """What ``generation_config.json`` holds for a generation config object (only the values set
    away from the defaults, for a transformers ``GenerationConfig``)."""
    if hasattr(config, "to_diff_dict"):
        return config.to_diff_dict()
    return config.to_dict()


class ModelOutput(OrderedDict):
    """transformers' ``ModelOutput`` behaviour without transformers: fields as attributes and
    keys, ``output[0]`` the first field that is not None, ``keys()``, ``to_tuple()``."""

    def __init__(self, **fields):
        super().__init__((k, v) for k, v in fields.items() if v is not None)
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self[k] for k in self.keys())


class CausalLMOutput(ModelOutput):
    """``forward``'s output: ``logits`` (batch, logits_to_keep, vocab) and, when compiled with
    ``output_hidden_states``, ``hidden_states`` (the embeddings and every layer's output, each
    (batch, tokens, hidden))."""

    def __init__(self, logits=None, hidden_states=None):
        super().__init__(logits=logits, hidden_states=hidden_states)


def resolve_model_dir(model_id, subfolder: str = "", revision=None, cache_dir=None) -> str:
    """The local directory of ``model_id``: a path, or a hub id (``org/name``) already in the
    Hugging Face cache (``cache_dir``, else the default cache). No network: a hub id that is not
    cached is a ``FileNotFoundError`` naming where it was looked for."""
    path = os.fspath(model_id)
    if os.path.isdir(path):
        if revision is not None:
            raise ValueError(f"revision {revision!r} applies to a hub id, not to the local directory {path}")
        return _sub(path, subfolder, path)
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"model_id {path!r} is not a local directory, and huggingface_hub (to look it up in the "
            "Hugging Face cache) is not installed"
        ) from None
    where = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    if path.count("/") > 1 or path.startswith((".", "/")) or os.sep in path.replace("/", ""):
        raise FileNotFoundError(f"model_id {path!r} is neither a local directory nor a hub id (org/name)")
    try:
        snapshot = snapshot_download(path, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, RevisionNotFoundError, HFValidationError, ...
        rev = f" at revision {revision!r}" if revision is not None else ""
        raise FileNotFoundError(
            f"model_id {path!r}{rev} is not a local directory and is not in the Hugging Face cache at "
            f"{where} (no network here: download it first, e.g. `hf download {path}`): {type(e).__name__}"
        ) from None
    return _sub(snapshot, subfolder, path)


def _sub(directory: str, subfolder: str, model_id: str) -> str:
    if not subfolder:
        return directory
    full = os.path.join(directory, subfolder)
    if not os.path.isdir(full):
        raise FileNotFoundError(f"subfolder {subfolder!r} of {model_id!r}: no directory {full}")
    return full
