"""Optimum RBLN's Auto classes: ``RBLNAutoModelForCausalLM``, ``RBLNAutoModelForImageTextToText``
and ``RBLNAutoConfig``, picking the class from the compiled directory (``rbln_config.json``'s
``cls_name``) or the checkpoint (``config.json``'s ``model_type``).

    model = RBLNAutoModelForImageTextToText.from_pretrained("compiled-dir", export=False)
"""

from __future__ import annotations

import json
import os

from .facade import NPUGemma3ForCausalLM
from .hf_compat import resolve_model_dir
from .multimodal import NPUGemma3ForConditionalGeneration
from .rbln_config import (
    CONFIG_NAME,
    NPUGemma3ForCausalLMConfig,
    NPUGemma3ForConditionalGenerationConfig,
    NPUModelConfig,
    NPUSiglipVisionModelConfig,
    rbln_name,
)

MODELS = (NPUGemma3ForCausalLM, NPUGemma3ForConditionalGeneration)
CONFIGS = (NPUGemma3ForCausalLMConfig, NPUGemma3ForConditionalGenerationConfig, NPUSiglipVisionModelConfig)


def config_class_named(name: str) -> type[NPUModelConfig]:
    """A config class by its Optimum RBLN (``RBLN...Config``) or our (``NPU...Config``) name."""
    for cls in CONFIGS:
        if name in (cls.__name__, rbln_name(cls)):
            return cls
    known = sorted(rbln_name(c) for c in CONFIGS)
    raise ValueError(f"Configuration for {name} not found (known: {known})")


class _AutoModel:
    """``from_pretrained`` that picks the model class, then calls its ``from_pretrained``."""

    # model_type of config.json -> the class this Auto class makes of it
    MAPPING: dict[str, type] = {}
    task = ""

    def __init__(self, *args, **kwargs):
        raise OSError(
            f"{type(self).__name__} is designed to be instantiated using {type(self).__name__}.from_pretrained(...)"
        )

    @classmethod
    def get_rbln_cls(cls, model_id, export=None, **kwargs) -> type:
        """The model class for ``model_id``: the one its ``rbln_config.json`` names when it is
        compiled (and export is not True), else the one for ``config.json``'s model_type."""
        hub = {k: kwargs.get(k) for k in ("subfolder", "revision", "cache_dir")}
        directory = resolve_model_dir(model_id, hub["subfolder"] or "", hub["revision"], hub["cache_dir"])
        saved = os.path.join(directory, CONFIG_NAME)
        if export is not True and os.path.exists(saved):
            name, _ = NPUModelConfig.read(saved)
            for model in cls.MAPPING.values():
                if name in (model.config_class.__name__, rbln_name(model.config_class)):
                    return model
            raise ValueError(f"{saved} names {name}, which {cls.__name__} does not make ({cls.task})")
        path = os.path.join(directory, "config.json")
        try:
            with open(path) as f:
                model_type = json.load(f).get("model_type")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{directory}: no config.json (and not compiled: no {CONFIG_NAME})"
            ) from None
        if model_type not in cls.MAPPING:
            raise ValueError(
                f"Unrecognized configuration class for {cls.__name__}: {path} has model_type {model_type!r}; "
                f"{cls.__name__} makes {sorted(cls.MAPPING)}"
            )
        return cls.MAPPING[model_type]

    @classmethod
    def from_pretrained(cls, model_id, export: bool | None = None, rbln_config=None, **kwargs):
        model_cls = cls.get_rbln_cls(model_id, export, **kwargs)
        return model_cls.from_pretrained(model_id, export=export, rbln_config=rbln_config, **kwargs)

    @classmethod
    def from_model(cls, model, config=None, rbln_config=None, model_save_dir=None, **kwargs):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in cls.MAPPING:
            raise ValueError(f"{cls.__name__} makes {sorted(cls.MAPPING)}, not model_type {model_type!r}")
        return cls.MAPPING[model_type].from_model(model, config, rbln_config, model_save_dir, **kwargs)


class RBLNAutoModelForCausalLM(_AutoModel):
    """Text generation: a Gemma3 checkpoint or compiled model, text-only (``gemma3_text``) or
    image+text (``gemma3``), as transformers' AutoModelForCausalLM maps them."""

    MAPPING = {"gemma3_text": NPUGemma3ForCausalLM, "gemma3": NPUGemma3ForConditionalGeneration}
    task = "causal language modelling"


class RBLNAutoModelForImageTextToText(_AutoModel):
    """Image+text to text: an image+text Gemma3 checkpoint (``gemma3``) or compiled model."""

    MAPPING = {"gemma3": NPUGemma3ForConditionalGeneration}
    task = "image-text-to-text"


class RBLNAutoConfig:
    """Optimum RBLN's config resolver: ``RBLNAutoConfig(cls_name=..., **fields)``,
    ``RBLNAutoConfig.load(path)`` and ``RBLNAutoConfig.load_from_dict(d)`` make the config class
    a saved ``cls_name`` names."""

    def __new__(cls, **kwargs):
        name = kwargs.get("cls_name")
        if name is None:
            raise ValueError("`cls_name` is required.")
        return config_class_named(name)(**kwargs)

    @staticmethod
    def load_from_dict(config_dict: dict) -> NPUModelConfig:
        name = config_dict.get("cls_name")
        if name is None:
            raise ValueError("`cls_name` is required.")
        return config_class_named(name)(**config_dict)

    @staticmethod
    def load(path, passed_rbln_config=None, kwargs=None, return_unused_kwargs: bool = False):
        """The config saved at ``path`` (``rbln_config.json`` or its directory), of the class it
        names; ``rbln_*`` entries of ``kwargs`` are taken out and override saved values."""
        if passed_rbln_config is not None:
            raise NotImplementedError("RBLNAutoConfig.load(passed_rbln_config=...): pass rbln_* kwargs")
        name, _ = NPUModelConfig.read(path)
        rest = dict(kwargs or {})
        ours = {k: rest.pop(k) for k in list(rest) if k.startswith("rbln_")}
        config = config_class_named(name).load(path, **ours)
        return (config, rest) if return_unused_kwargs else config


__all__ = ["RBLNAutoConfig", "RBLNAutoModelForCausalLM", "RBLNAutoModelForImageTextToText"]
