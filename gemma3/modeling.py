"""The facade: ``NPUGemma3ForCausalLM`` with Optimum RBLN's API (and its ``RBLN*`` alias).

    model = NPUGemma3ForCausalLM.from_pretrained("path/to/gemma3", rbln_max_seq_len=512)
    out = model.generate(input_ids, max_new_tokens=32)
    model.save_pretrained("compiled")     # loads back without recompiling

A directory is *compiled* when it holds ``rbln_config.json`` and ``compiled/`` (device-layout
weights and the kernels' planned schedules); ``export=None`` compiles unless it is.

``NPUGemma3PreTrainedModel`` holds what this facade shares with the image+text one
(``gemma3/multimodal.py``): loading, compiling, saving and the generation loop.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import ml_dtypes
import numpy as np

from npu_emulator import CycleReport, OperandShapeError
from npu_emulator.errors import EmulatorError

from .atomic import OwnedSave, check_complete
from .config import Gemma3TextConfig
from .generation import (
    INERT,
    NOT_IMPLEMENTED,
    GenerateOutput,
    GenerationSettings,
    generate_loop,
    padding_mask,
    read_generation_config,
    to_dict,
    torch_sampler,
)
from .model import Gemma3OnNPU
from .plans import PLANS, load_plans, save_plans
from .rbln_config import CONFIG_NAME, NPUGemma3ForCausalLMConfig, NPUModelConfig, strip_rbln
from .tokenizer import Gemma3Tokenizer, TokenizerError
from .weights import Checkpoint, SafetensorsFile, text_weights, write_safetensors

COMPILED = "compiled"
WEIGHTS = "weights.safetensors"
MANIFEST = "npu_gemma3_manifest.json"  # what save_pretrained wrote (see save_pretrained)


class GenerationReport:
    """Emulated cost and host time of one ``generate`` call."""

    def __init__(
        self,
        prefill: CycleReport | None,
        decode: CycleReport | None,
        prompt_tokens: int,
        new_tokens: int,
        host_prefill_s: float,
        host_decode_s: float,
    ):
        self.prefill, self.decode = prefill, decode
        self.prompt_tokens, self.new_tokens = prompt_tokens, new_tokens
        self.host_prefill_s, self.host_decode_s = host_prefill_s, host_decode_s

    def phases(self) -> list[tuple[str, CycleReport | None, int, float]]:
        """(phase, its emulated cost, tokens, host seconds), in the order the phases ran."""
        return [
            ("prefill", self.prefill, self.prompt_tokens, self.host_prefill_s),
            ("decode", self.decode, self.new_tokens, self.host_decode_s),
        ]

    def table(self) -> str:
        phases = self.phases()
        w = max(10, max(len(name) for name, *_ in phases) + 2)
        rows = [
            f"{'phase':<{w}}{'tokens':>8}{'emulated cycles':>18}{'emulated ms':>14}{'emulated tok/s':>16}{'host tok/s':>12}"
        ]
        for name, rep, n, host in phases:
            if rep is None:
                rows.append(f"{name:<{w}}{n:>8}{'-':>18}{'-':>14}{'-':>16}{'-':>12}")
                continue
            ms = rep.time_us / 1e3
            rows.append(
                f"{name:<{w}}{n:>8}{rep.cycles:>18,}{ms:>14.3f}{n / (ms / 1e3) if ms else 0:>16,.1f}{n / host if host else 0:>12,.1f}"
            )
        return "\n".join(rows)


class NPUGemma3PreTrainedModel:
    """What the text and the image+text facades share: ``from_pretrained`` (export or load a
    compiled directory), ``from_model``, ``compile``, ``save_pretrained`` and the generation
    loop. A subclass names its configuration classes and fills in the hooks (``_read_config``,
    ``_from_checkpoint``, ``_from_compiled``, ``_compiled_fields``, ``_plan_all``,
    ``_device_tensors``); ``self.runtime`` is its ``Gemma3OnNPU``."""

    config_class: type[NPUModelConfig]
    hf_model_type = ""  # transformers' model_type that from_model accepts
    hf_class_name = ""  # the transformers class, for error messages

    runtime: Gemma3OnNPU
    rbln_config: NPUModelConfig
    generation_config: dict
    tokenizer: Gemma3Tokenizer | None
    last_report: GenerationReport | None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, model_id, export: bool | None = None, rbln_config=None, **kwargs):
        """A model from a local directory: compiled from its Hugging Face checkpoint (``export``
        True, or None and the directory is not compiled) or loaded compiled. ``rbln_config`` (a
        dict or ``config_class`` instance) and ``rbln_``-prefixed kwargs set the configuration;
        loading a compiled directory may change only fields the compiled artefacts do not
        depend on."""
        directory = os.fspath(model_id)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"model_id {directory!r} is not a local directory (no hub access here)")
        overrides, rest = strip_rbln(kwargs)
        if rest:
            raise TypeError(f"from_pretrained: unexpected keyword argument(s) {sorted(rest)}")
        compiled = is_compiled(directory)
        if export is None:
            export = not compiled
        if not export and not compiled:
            raise ValueError(
                f"{directory} is not compiled (no {CONFIG_NAME} and {COMPILED}/); pass export=True"
            )
        config = cls._read_config(directory)
        gen = read_generation_config(directory)
        if export:
            rbln = cls.config_class.from_any(rbln_config, **overrides)
            cls._check_sequence_sizes(config, rbln)
            model = cls._from_checkpoint(directory, config, rbln, gen)
            model.compile()
            return model
        check_complete(directory, MANIFEST)
        saved = cls.config_class.load(directory)
        rbln = cls.config_class.from_any(saved, **overrides)
        if rbln_config is not None:
            rbln = cls.config_class.from_any(rbln, **_config_overrides(cls.config_class, rbln_config))
        was, now = cls._compiled_fields(saved), cls._compiled_fields(rbln)
        changed = [f for f in was if now[f] != was[f]]
        if changed:
            raise ValueError(
                f"{directory} was compiled with other {changed}; load it with export=True to recompile"
            )
        cls._check_sequence_sizes(config, rbln)
        model = cls._from_compiled(directory, config, rbln, gen, read_compiled_weights(directory))
        load_plans(model.runtime.npu, os.path.join(directory, COMPILED))
        return model

    @classmethod
    def _read_config(cls, directory):
        raise NotImplementedError

    @classmethod
    def _text_parts(cls, config, rbln) -> tuple[Gemma3TextConfig, NPUGemma3ForCausalLMConfig, str]:
        """The language model's config, its rbln config, and that one's name in messages."""
        return config, rbln, ""

    @classmethod
    def _check_sequence_sizes(cls, config, rbln) -> None:
        """``max_seq_len`` (``max_position_embeddings`` when unset) must lie between
        ``prefill_chunk_size`` and ``max_position_embeddings``."""
        text, lm, where = cls._text_parts(config, rbln)
        positions, chunk = text.max_position_embeddings, lm.prefill_chunk_size
        seq = lm.max_seq_len or positions
        if seq > positions:
            raise ValueError(
                f"{where}max_seq_len {seq} exceeds max_position_embeddings {positions} (config.json): "
                "the model has RoPE tables for, and was trained on, that many positions only"
            )
        if seq < chunk:
            raise ValueError(
                f"{where}max_seq_len {seq} is below {where}prefill_chunk_size {chunk}: a prefill chunk "
                f"holds at most max_seq_len tokens; set prefill_chunk_size to a multiple of 64 no larger "
                f"than {seq}, or max_seq_len to at least {chunk}"
            )

    @classmethod
    def _from_checkpoint(cls, directory, config, rbln, gen):
        """The model from a Hugging Face checkpoint (not compiled yet)."""
        raise NotImplementedError

    @classmethod
    def _from_compiled(cls, directory, config, rbln, gen, weights: dict):
        """The model from the device-layout weights a ``save_pretrained`` wrote."""
        raise NotImplementedError

    @classmethod
    def _compiled_fields(cls, rbln) -> dict:
        """The rbln_config fields the compiled artefacts depend on (a load may not change them)."""
        raise NotImplementedError

    @classmethod
    def from_model(cls, model, config=None, rbln_config=None, model_save_dir=None, **kwargs):
        """Compile a transformers model (needs the oracle extra)."""
        try:
            import transformers
        except ImportError:
            raise ImportError("from_model needs transformers (pip install 'npu-gemma3[oracle]')") from None
        if (
            not isinstance(model, transformers.PreTrainedModel)
            or getattr(model.config, "model_type", None) != cls.hf_model_type
        ):
            raise TypeError(
                f"from_model expects a transformers {cls.hf_class_name}, got {type(model).__name__}"
            )
        if config is not None:
            model.config = config
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            compiled = cls.from_pretrained(tmp, export=True, rbln_config=rbln_config, **kwargs)
            if model_save_dir is not None:
                compiled.save_pretrained(model_save_dir)
                compiled.model_dir = os.fspath(model_save_dir)
        return compiled

    def compile(self):
        """Plan every kernel at the model's static shapes; name any that does not fit."""
        try:
            self._plan_all()
        except (EmulatorError, OperandShapeError) as e:
            raise ValueError(f"compiling for {self.runtime.npu.config.name!r}: {e}") from None

    def _plan_all(self):
        self.runtime.plan_all()

    # ------------------------------------------------------------------ saving

    def _config_json(self) -> dict:
        """config.json as read (the transformers config)."""
        raise NotImplementedError

    def _device_tensors(self) -> dict:
        """Name -> DeviceTensor of every weight the compiled directory stores."""
        rt = self.runtime
        # The tied LM head is not stored: it is rebuilt from the embedding.
        return {name: t for name, t in rt.weights.items() if name not in rt.aliases}

    def _save_files(self, directory) -> None:
        """Files besides the configs, weights and plans (the tokenizer's)."""
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

    def save_pretrained(self, save_directory):
        """Write config.json, generation_config.json, the tokenizer's files, rbln_config.json,
        ``compiled/`` (weights.safetensors, plans.json) and ``MANIFEST`` into ``save_directory``,
        as transformers does: the directory is made if needed, files of ours from an earlier
        save are replaced, and every other file in it is left untouched.

        Ours: ``MANIFEST`` lists every file a save wrote with its size and SHA-256; a file is
        ours while it still has the hash listed (changed by someone since, it is not). A file
        this save must write that exists and is not ours (saving into the Hugging Face
        checkpoint's own directory, say: its config.json) raises ``FileExistsError`` naming
        the files, and nothing changes; so does a ``save_directory`` that is a file
        (``NotADirectoryError``).

        Everything is staged first, then renamed into place (``gemma3.atomic.OwnedSave``): an
        error at any point leaves the earlier save as it was; a process killed while renaming
        leaves a journal, and loading refuses that directory until a save completes."""
        with OwnedSave(save_directory, MANIFEST) as save:
            tmp = save.path
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(self._config_json(), f, indent=2)
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(self.generation_config, f, indent=2)
            self._save_files(tmp)
            self.rbln_config.save(tmp)
            save.check(also=[f"{COMPILED}/{WEIGHTS}", f"{COMPILED}/{PLANS}"])  # before the big write
            os.makedirs(os.path.join(tmp, COMPILED))
            tensors = {}
            for name, t in self._device_tensors().items():
                data = t.numpy()
                # bf16 numerics hold bf16 values: store 2 bytes each, exactly; fp32 keeps fp32.
                exact = t.dtype == "bf16" and self.rbln_config.numerics == "bf16"
                tensors[name] = data.astype(ml_dtypes.bfloat16) if exact else data
            write_safetensors(
                os.path.join(tmp, COMPILED, WEIGHTS), tensors, {"format": "npu-gemma3 device layout"}
            )
            save_plans(self.runtime.npu, os.path.join(tmp, COMPILED))

    # ------------------------------------------------------------------ generation

    def _remember_compiled_config(self) -> None:
        """Record the rbln_config the model is compiled with (the end of ``__init__``)."""
        self._compiled_config = _config_state(self.rbln_config)

    def _check_config_unchanged(self) -> None:
        """``model.rbln_config`` edited after compiling no longer describes the model: the
        caches, plans and chip were made for the recorded values, so refuse it, naming fields."""
        now = _config_state(self.rbln_config)
        was = self._compiled_config
        changed = [
            f"{k} was {was.get(k)!r} when compiled and is {now.get(k)!r} now"
            for k in sorted(set(was) | set(now))
            if was.get(k) != now.get(k)
        ]
        if changed:
            raise ValueError(
                f"model.rbln_config no longer matches what was compiled: {'; '.join(changed)}; "
                "compile again (from_pretrained with the rbln_ settings) instead of editing rbln_config"
            )

    def _token_ids_beyond_vocab(self) -> dict[int, str]:
        """Ids past the text vocabulary that prompts may hold, with what each is."""
        return {}

    def _check_prompts(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Refuse, naming the sequence and the numbers: no prompt at all, a mask that is not
        0 / 1, a sequence with no token (its mask row all zeros), a token id outside the
        vocabulary where the mask keeps it (padding is never embedded)."""
        if ids.size == 0:
            raise ValueError(
                f"input_ids is empty (shape {ids.shape}): generate needs at least one prompt token "
                "per sequence (a bos token, say)"
            )
        if not np.isin(mask, (0, 1)).all():
            b, p = np.argwhere(~np.isin(mask, (0, 1)))[0]
            raise ValueError(f"attention_mask must hold 0 and 1 only, got {mask[b, p]} at [{b}, {p}]")
        empty = np.flatnonzero(mask.sum(axis=1) == 0)
        if empty.size:
            raise ValueError(
                f"attention_mask row(s) {empty.tolist()} are all zeros: sequence {empty[0]} has no prompt "
                f"token (of {ids.shape[1]}) to start from"
            )
        vocab, extra = self.runtime.c.vocab_size, self._token_ids_beyond_vocab()
        outside = mask.astype(bool) & ((ids < 0) | (ids >= vocab)) & ~np.isin(ids, list(extra))
        if outside.any():
            b, p = np.argwhere(outside)[0]
            also = "".join(f" and is not {what} {i}" for i, what in extra.items())
            raise ValueError(
                f"input_ids[{b}, {p}] = {ids[b, p]} is outside the vocabulary of {vocab} tokens "
                f"(ids 0..{vocab - 1}){also}"
            )

    def _generate(self, input_ids, attention_mask, generation_config, kwargs, prepare=None, report=None):
        """``generate`` with Hugging Face semantics on ``self.runtime``.

        ``prepare(ids, mask)`` (optional) checks extra inputs before anything runs and returns
        a function giving, when prefill starts, one dict of extra ``runtime.prefill`` arguments
        per sequence. ``report(prompt_tokens, new_tokens, timer)`` (optional) makes
        ``last_report``; the default reports prefill and decode. Options come from the model config (special
        ids), ``generation_config.json``, ``generation_config``, then keywords; one that changes the tokens and
        is not implemented (``NOT_IMPLEMENTED`` in ``generation.py``) raises NotImplementedError naming it.
        Sampling with torch inputs and no ``seed`` draws from torch's global generator, otherwise from
        ``np.random.default_rng(seed)``."""
        self._check_config_unchanged()
        streamer = kwargs.pop("streamer", None)
        kind, ids = _to_numpy(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        model_ids = {k: getattr(self.config, k) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
        settings = GenerationSettings.merge(
            model_ids,
            self.generation_config,
            to_dict(generation_config),
            kwargs,
            names=("config.json", "generation_config.json", "the generation_config argument", "a keyword"),
            none_turns_off=("a keyword",),
        )
        unknown = set(kwargs) - set(GenerationSettings.__dataclass_fields__) - set(NOT_IMPLEMENTED) - INERT
        if unknown:
            raise TypeError(f"generate: unexpected keyword argument(s) {sorted(unknown)}")
        if attention_mask is None:
            mask = padding_mask(ids, settings.pad_token_id, settings.eos_token_id)
        else:
            mask = _attention_mask(attention_mask, ids)
        self._check_prompts(ids, mask)
        batch = ids.shape[0]
        if batch > self.rbln_config.batch_size:
            raise ValueError(
                f"batch of {batch} sequences exceeds the compiled batch_size {self.rbln_config.batch_size}"
            )
        lengths = mask.sum(axis=1)
        n_new = settings.new_tokens(ids.shape[1])
        if int(lengths.max()) + n_new > self.max_seq_len:
            raise ValueError(
                f"prompt of {int(lengths.max())} tokens + {n_new} new tokens exceeds max_seq_len "
                f"{self.max_seq_len}; compile with a larger rbln_max_seq_len"
            )
        extras = prepare(ids, mask) if prepare is not None else None
        rt = self.runtime
        rt.reset()
        timer = {"prefill": 0.0, "decode": 0.0, "steps": 0}
        static_batch = self.rbln_config.batch_size

        def prefill(input_ids, attention_mask):
            t = time.perf_counter()
            per_row = extras() if extras is not None else [{}] * batch
            rows = [
                rt.prefill(b, input_ids[b][attention_mask[b].astype(bool)], **per_row[b])
                for b in range(batch)
            ]
            timer["prefill"] += time.perf_counter() - t
            return np.stack(rows)

        def decode(tokens):
            t = time.perf_counter()
            full = np.zeros(static_batch, np.int64)
            full[:batch] = tokens
            logits = rt.decode(full)[:batch]
            timer["decode"] += time.perf_counter() - t
            timer["steps"] += 1
            return logits

        sample = torch_sampler() if kind == "torch" and settings.seed is None else None
        sequences, raw_logits, scores = generate_loop(prefill, decode, ids, mask, settings, streamer, sample)
        prompt_tokens, new_tokens = int(lengths.sum()), timer["steps"] * batch
        if report is not None:
            self.last_report = report(prompt_tokens, new_tokens, timer)
        else:
            reports = rt.reports()
            self.last_report = GenerationReport(
                reports["prefill"],
                reports["decode"],
                prompt_tokens,
                new_tokens,
                timer["prefill"],
                timer["decode"],
            )
        sequences = _from_numpy(kind, sequences, input_ids)
        if settings.return_dict_in_generate:
            return GenerateOutput(
                sequences,
                tuple(_from_numpy(kind, x, input_ids) for x in raw_logits)
                if settings.output_logits
                else None,
                tuple(_from_numpy(kind, x, input_ids) for x in scores) if settings.output_scores else None,
            )
        return sequences


class NPUGemma3ForCausalLM(NPUGemma3PreTrainedModel):
    config_class = NPUGemma3ForCausalLMConfig
    hf_model_type = "gemma3_text"
    hf_class_name = "Gemma3ForCausalLM"

    def __init__(
        self,
        directory: str,
        config: Gemma3TextConfig,
        rbln_config: NPUGemma3ForCausalLMConfig,
        device_weights: dict,
        generation_config: dict,
    ):
        self.model_dir = directory
        self.config = config
        self.rbln_config = rbln_config
        self.generation_config = generation_config
        self.runtime = Gemma3OnNPU(config, rbln_config, device_weights)
        self.max_seq_len = self.runtime.max_seq_len
        self.tokenizer = load_tokenizer(directory)
        self.last_report: GenerationReport | None = None
        self._remember_compiled_config()

    @classmethod
    def _read_config(cls, directory) -> Gemma3TextConfig:
        return Gemma3TextConfig.from_json(os.path.join(directory, "config.json"))

    @classmethod
    def _from_checkpoint(cls, directory, config, rbln, gen):
        ckpt = Checkpoint(directory)
        names = text_weights(ckpt, config)
        weights = Gemma3OnNPU.device_weights(config, lambda n: ckpt.float32(names[n]))
        return cls(directory, config, rbln, weights, gen)

    @classmethod
    def _from_compiled(cls, directory, config, rbln, gen, weights):
        return cls(directory, config, rbln, weights, gen)  # a tied LM head saved earlier is ignored

    @classmethod
    def _compiled_fields(cls, rbln) -> dict:
        fields = {f: getattr(rbln, f) for f in ("batch_size", "max_seq_len", "prefill_chunk_size")}
        return {**fields, "npu": rbln.npu_config}  # the chip itself, however it was named

    def _config_json(self) -> dict:
        return self.config.raw

    def generate(self, input_ids, attention_mask=None, generation_config=None, **kwargs):
        return self._generate(input_ids, attention_mask, generation_config, kwargs)


def load_tokenizer(directory) -> Gemma3Tokenizer | None:
    """The directory's tokenizer, or None when it has none."""
    try:
        return Gemma3Tokenizer(directory)
    except TokenizerError:
        return None


def read_compiled_weights(directory) -> dict[str, np.ndarray]:
    """compiled/weights.safetensors, memory-mapped: tensors as stored (the upload to the NPU
    copies them once), fp16 ones widened to fp32."""
    f = SafetensorsFile(os.path.join(directory, COMPILED, WEIGHTS))
    return {
        name: f.raw(name) if f.tensors[name][0] in ("BF16", "F32", "I32", "I64") else f.float32(name)
        for name in f.tensors
    }


def _config_overrides(config_class, rbln_config) -> dict:
    """The fields an ``rbln_config`` argument sets over a saved configuration: a dict's keys
    (checked), or every field of a config instance."""
    if isinstance(rbln_config, dict):
        config_class.from_any(rbln_config)  # a bad field raises here, naming it
        return dict(rbln_config)
    return config_class.from_any(rbln_config).to_dict()


def is_compiled(directory) -> bool:
    return os.path.exists(os.path.join(directory, CONFIG_NAME)) and os.path.exists(
        os.path.join(directory, COMPILED, WEIGHTS)
    )


def _config_state(rbln) -> dict:
    """Every field of an rbln config as ``{name: value}``, sub-configs' and the chip's
    (described in full: a preset's name and its NPUConfig are one chip) as ``part.field``."""
    d = rbln.to_dict()
    d["npu"] = rbln.npu_config.to_dict()
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value

    walk("", d)
    return flat


def _attention_mask(mask, ids: np.ndarray) -> np.ndarray:
    m = _to_numpy(mask)[1]
    if m.shape != ids.shape and m.size == ids.size and m.ndim == 1:
        m = m.reshape(ids.shape)  # a single prompt's mask, as its input_ids
    if m.shape != ids.shape:
        raise ValueError(f"attention_mask {m.shape} must have the shape of input_ids {ids.shape}")
    return m


def _to_numpy(x):
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor
        return "torch", x.detach().cpu().numpy().astype(np.int64)
    if isinstance(x, np.ndarray):
        return "numpy", x.astype(np.int64)
    if isinstance(x, (list, tuple)):
        return "list", np.asarray(x, dtype=np.int64)
    raise TypeError(f"input_ids must be a NumPy array, a list or a torch tensor, got {type(x).__name__}")


def _from_numpy(kind, arr, like):
    if kind == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(arr))
    if kind == "list":
        return arr.tolist()
    return arr


RBLNGemma3ForCausalLM = NPUGemma3ForCausalLM
