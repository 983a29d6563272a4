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
from .hf_compat import (
    CausalLMOutput,
    generation_config,
    generation_dict,
    pretrained_config,
    resolve_model_dir,
)
from .lora import adapter_ids, lora_device_weights
from .plans import PLANS, load_plans, save_plans
from .rbln_config import CONFIG_NAME, NPUGemma3ForCausalLMConfig, NPUModelConfig, given_fields, normalize
from .runtime import Gemma3OnNPU
from .tensor_parallel import build_runtime
from .tokenizer import Gemma3Tokenizer, TokenizerError
from .weights import Checkpoint, SafetensorsFile, text_weights, write_safetensors

COMPILED = "compiled"
# Language-model fields that choose which graphs are compiled and what they take and return.
GRAPH_FIELDS = ("decoder_batch_sizes", "phases", "use_inputs_embeds", "output_hidden_states")
# The decode attention kernel and its plans (flash_attn: partitioned, runtime.py).
ATTENTION_FIELDS = ("attn_impl", "kvcache_partition_len", "kvcache_block_size", "relax_flash_attn_limits")
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
        splits: dict | None = None,
    ):
        self.prefill, self.decode = prefill, decode
        # Tensor parallel: phase -> shares of its cycles in compute, memory and communication.
        self.splits = splits or {}
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
        if self.splits:
            rows.append(f"{'phase':<{w}}{'compute':>10}{'memory':>10}{'communication':>15}")
            for name, split in self.splits.items():
                rows.append(
                    f"{name:<{w}}{split['compute']:>10.1%}{split['memory']:>10.1%}{split['communication']:>15.1%}"
                )
        return "\n".join(rows)


class _DirectoryTokenizer:
    """``model.tokenizer``: the model directory's tokenizer (None without one), parsed on first
    use: a 262k-entry tokenizer.json takes about a second to parse, and ``generate`` never needs
    it (the CLI parses its own before it knows which compiled directory to load)."""

    def __get__(self, model, owner=None):
        if model is None:
            return self
        if "_tokenizer" not in model.__dict__:
            model._tokenizer = load_tokenizer(model.model_dir)
        return model._tokenizer

    def __set__(self, model, tokenizer):
        model._tokenizer = tokenizer


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
    tokenizer = _DirectoryTokenizer()
    model_config: Gemma3TextConfig  # config.json as our reader holds it (``config``: transformers')
    tokenizer: Gemma3Tokenizer | None
    last_report: GenerationReport | None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, model_id, export: bool | None = None, rbln_config=None, **kwargs):
        """A model from a local directory or a hub id in the local Hugging Face cache: compiled
        from its Hugging Face checkpoint (``export`` True, or None and the directory is not
        compiled) or loaded compiled. ``rbln_config`` (None, a dict, a ``config_class``
        instance or a saved one's path) and ``rbln_``-prefixed kwargs set the configuration,
        normalised once here; loading a compiled directory may change only fields the compiled
        artefacts do not depend on.

        Also, as transformers / Optimum RBLN: ``subfolder`` (the model inside ``model_id``),
        ``revision`` and ``cache_dir`` (where a hub id is looked up; no network),
        ``dtype`` / ``torch_dtype`` (checked; weights are read as stored and rounded by the
        ``numerics`` of the chip), ``trust_remote_code`` (no effect: Gemma3 needs no remote
        code), ``model_save_dir`` (export: also save the compiled model there)."""
        rbln, rest = normalize(cls.config_class, rbln_config, kwargs)
        user = given_fields(rbln)  # what the caller set, to lay over a saved configuration
        hub = {k: rest.pop(k) for k in ("subfolder", "revision", "cache_dir") if k in rest}
        _check_dtype(rest.pop("dtype", None), rest.pop("torch_dtype", None))
        rest.pop("trust_remote_code", None)
        model_save_dir = rest.pop("model_save_dir", None)
        if rest:
            raise TypeError(f"from_pretrained: unexpected keyword argument(s) {sorted(rest)}")
        directory = resolve_model_dir(
            model_id, hub.get("subfolder") or "", hub.get("revision"), hub.get("cache_dir")
        )
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
            cls._check_sequence_sizes(config, rbln)
            model = cls._from_checkpoint(directory, config, rbln, gen)
            model.compile()
            if model_save_dir is not None:
                model.save_pretrained(model_save_dir)
                model.model_save_dir = os.fspath(model_save_dir)
            return model
        check_complete(directory, MANIFEST)
        saved = cls.config_class.load(directory)
        rbln = cls.config_class.from_any(saved, **user)
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
        ``prefill_chunk_size`` and ``max_position_embeddings``; then the language model's
        config against the model (attention, cache and paged-cache fields; what cannot be
        built yet: tensor parallelism, LoRA, quantization)."""
        text, lm, where = cls._text_parts(config, rbln)
        rbln.check_compilable()
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
        lm.check_model(text, seq, where)

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
    def from_model(cls, model, config=None, rbln_config=None, model_save_dir=None, subfolder="", **kwargs):
        """Compile a transformers model (needs the oracle extra). ``subfolder``: as Optimum
        RBLN's, where submodules are saved; only "" (the whole model) here."""
        if subfolder:
            raise NotImplementedError(f"from_model subfolder {subfolder!r}: the model is saved whole")
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
                compiled.model_dir = compiled.model_save_dir = os.fspath(model_save_dir)
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

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
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
        leaves a journal, and loading refuses that directory until a save completes.

        ``push_to_hub=True`` is refused (no network here); other kwargs raise ``TypeError``."""
        if push_to_hub:
            raise NotImplementedError(
                "save_pretrained(push_to_hub=True): no hub access here; save, then upload the directory "
                "with huggingface_hub's upload_folder"
            )
        if kwargs:
            raise TypeError(f"save_pretrained: unexpected keyword argument(s) {sorted(kwargs)}")
        with OwnedSave(save_directory, MANIFEST) as save:
            tmp = save.path
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(self._config_json(), f, indent=2)
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(generation_dict(self.generation_config), f, indent=2)
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
        self._check_adapter_set()
        if not self.can_generate():
            raise ValueError(
                f"this model was compiled without the decode phase (phases={self._lm_config.phases}); "
                "compile with rbln_config phases including 'decode' to generate"
            )
        streamer = kwargs.pop("streamer", None)
        embeds = kwargs.pop("inputs_embeds", None)
        prompt_given = input_ids is not None
        kind, ids, prepare = self._prompt_ids("generate", input_ids, embeds, attention_mask, prepare)
        model_ids = {
            k: getattr(self.model_config, k) for k in ("eos_token_id", "pad_token_id", "bos_token_id")
        }
        settings = GenerationSettings.merge(
            model_ids,
            generation_dict(self.generation_config),
            to_dict(generation_config),
            kwargs,
            names=("config.json", "generation_config.json", "the generation_config argument", "a keyword"),
            none_turns_off=("a keyword",),
        )
        unknown = set(kwargs) - set(GenerationSettings.__dataclass_fields__) - set(NOT_IMPLEMENTED) - INERT
        if unknown:
            raise TypeError(f"generate: unexpected keyword argument(s) {sorted(unknown)}")
        if attention_mask is None and prompt_given:
            mask = padding_mask(ids, settings.pad_token_id, settings.eos_token_id)
        elif attention_mask is None:  # inputs_embeds alone: nothing to infer padding from
            mask = np.ones_like(ids)
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
        # The decoder compiled for the smallest batch that holds this one (decoder_batch_sizes, as
        # Optimum RBLN's runtime picks it): the batch is padded to it, and costs what it costs.
        decoder_batch = min(s for s in self._lm_config.decoder_batch_sizes if s >= batch)

        def prefill(input_ids, attention_mask):
            t = time.perf_counter()
            per_row = extras() if extras is not None else [{}] * batch
            rows = [
                rt.prefill(b, input_ids[b][attention_mask[b].astype(bool)], **per_row[b])
                for b in range(batch)
            ]
            timer["prefill"] += time.perf_counter() - t
            return np.stack(rows)

        def stepper(run):  # a decode step of the padded batch, timed: run(tokens) -> per-row results
            def step(tokens, *more):
                t = time.perf_counter()
                full = np.zeros(decoder_batch, np.int64)
                full[:batch] = tokens
                out = run(full, *more)[:batch]
                timer["decode"] += time.perf_counter() - t
                timer["steps"] += 1
                return out

            return step

        decode = stepper(rt.decode)  # logits
        decode_top = stepper(rt.decode_top)  # their argmax alone (no logits returned, none processed)

        sample = torch_sampler() if kind == "torch" and settings.seed is None else None
        sequences, raw_logits, scores = generate_loop(
            prefill,
            decode,
            ids,
            mask,
            settings,
            streamer,
            sample,
            None if settings.logits_returned() else decode_top,
        )
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
                {p: rt.cost[p].split() for p in ("prefill", "decode") if rt.cost[p].reports}
                if rt.cost["prefill"].collectives or rt.cost["decode"].collectives
                else None,
            )
        if not prompt_given:  # transformers: from inputs_embeds alone, only the new tokens come back
            sequences = sequences[:, ids.shape[1] :]
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

    def _prompt_ids(self, what, input_ids, embeds, attention_mask, prepare):
        """(kind of input, ids (B, T) int64, prepare) of a ``generate`` or ``forward`` call from
        ``input_ids`` or ``inputs_embeds`` (``_embeds_inputs``)."""
        if embeds is not None:
            input_ids, prepare = self._embeds_inputs(input_ids, embeds, attention_mask, prepare)
        if input_ids is None:
            raise ValueError(f"{what} needs input_ids or inputs_embeds")
        kind, ids = _to_numpy(input_ids)
        return kind, (ids[None] if ids.ndim == 1 else ids), prepare

    def _embeds_inputs(self, input_ids, embeds, attention_mask, prepare):
        """``inputs_embeds`` (B, T, hidden) for a model compiled with ``use_inputs_embeds``:
        (input_ids, or zeros standing in for them, and a ``prepare`` that hands each sequence's
        embeddings of its real tokens to ``runtime.prefill``)."""
        lm = self._lm_config
        if not lm.use_inputs_embeds:
            raise ValueError(
                "inputs_embeds given, but the model was compiled without use_inputs_embeds; compile with "
                "rbln_config={'use_inputs_embeds': True}"
                + (" in language_model" if lm is not self.rbln_config else "")
            )
        if prepare is not None:
            raise NotImplementedError("inputs_embeds together with images (pixel_values): pass input_ids")
        torch_in = hasattr(embeds, "detach")
        e = np.asarray(embeds.detach().cpu().float().numpy() if torch_in else embeds, np.float32)
        if e.ndim == 2:
            e = e[None]
        hidden = self.runtime.c.hidden_size
        if e.ndim != 3 or e.shape[2] != hidden or 0 in e.shape:
            raise ValueError(f"inputs_embeds {e.shape} must be (batch, tokens, {hidden}) with tokens >= 1")
        if input_ids is None:  # ids stand-ins (0: in the vocabulary; never embedded)
            input_ids = np.zeros(e.shape[:2], np.int64)
            if torch_in:
                input_ids = _from_numpy("torch", input_ids, None)
        ids = _to_numpy(input_ids)[1]
        if ids.shape != e.shape[:2] and ids.size == e.shape[0] * e.shape[1]:
            ids = ids.reshape(e.shape[:2])
        if ids.shape != e.shape[:2]:
            raise ValueError(f"input_ids {ids.shape} must match inputs_embeds {e.shape[:2]}")

        def rows(ids_, mask_):
            return lambda: [{"embeds": e[b][mask_[b].astype(bool)]} for b in range(e.shape[0])]

        return input_ids, rows

    # ------------------------------------------------------------------ LoRA

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Sets the active adapter(s) by name (Optimum RBLN's ``set_adapter``): one name for
        every batch row, or a list of one name per row (its length the compiled batch_size);
        "base" is the model without an adapter. Raises ValueError if the model is not
        configured with LoRA or if an adapter name is not found."""
        lm = self._lm_config
        self.runtime.lora.ids[:] = adapter_ids(lm.lora_config, adapter_name, lm.batch_size)
        self._adapter_set = True

    def _check_adapter_set(self) -> None:
        """A model compiled with LoRA runs once an adapter is set, as Optimum RBLN's runtime."""
        if self._lm_config.use_lora and not getattr(self, "_adapter_set", False):
            raise ValueError(
                "lora_int_id is required when using LoRA. "
                "You should call set_lora_int_ids() before forward() or pass lora_int_id to forward(). "
                "(Here: call set_adapter(name) first.)"
            )

    # ------------------------------------------------------------------ as transformers' models

    @property
    def _lm_config(self) -> NPUGemma3ForCausalLMConfig:
        """The language model's rbln config (the sub-config of the image+text model)."""
        return getattr(self.rbln_config, "language_model", self.rbln_config)

    @property
    def config(self):
        """config.json as a transformers ``Gemma3TextConfig`` / ``Gemma3Config`` (or, without
        transformers, a view with the same attribute names)."""
        if getattr(self, "_hf_config", None) is None:
            self._hf_config = pretrained_config(self.model_config.raw)
        return self._hf_config

    @property
    def compiled_models(self) -> dict:
        """Name -> the emulated device holding its planned kernels, one entry per graph Optimum
        RBLN compiles (prefill, one decoder per decoder batch size, image prefill, vision tower):
        here all run on one ``npu_emulator.NPU``."""
        lm, npu = self._lm_config, self.runtime.npu
        names = ["prefill"] + [f"decoder_batch_{b}" for b in lm.decoder_batch_sizes or []]
        if lm.image_prefill_chunk_size is not None:
            names.insert(1, "image_prefill")
        if hasattr(self, "vision"):
            names.insert(0, "vision_tower")
        return {name: npu for name in names}

    @property
    def device(self):
        """Where inputs go: the host (``torch.device("cpu")`` with torch installed), as the real
        runtime takes host tensors and copies them to the NPU itself."""
        try:
            import torch
        except ImportError:
            return "cpu"
        return torch.device("cpu")

    def can_generate(self) -> bool:
        """Whether the model was compiled with the decode phase (``phases``)."""
        return self._lm_config.can_generate

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        """One prefill of the batch from an empty cache, as Optimum RBLN's decoder-only forward:
        ``CausalLMOutput`` with ``logits`` (batch, 1, vocab) of each sequence's last real token
        (``logits_to_keep`` = 1) and, when compiled with ``output_hidden_states``,
        ``hidden_states``: the embeddings and every layer's output, (batch, tokens, hidden),
        left-padded rows zero. ``position_ids`` (Gemma3: ``use_position_ids``) must be the real
        tokens' 0, 1, 2, ... (left padding); the image model also takes ``pixel_values`` and
        ``token_type_ids``. The model stays ready for another forward or generate."""
        self._check_config_unchanged()
        self._check_adapter_set()
        lm = self._lm_config
        prepare = self._forward_prepare(kwargs, embeds=inputs_embeds is not None)
        if kwargs:
            raise TypeError(f"forward: unexpected keyword argument(s) {sorted(kwargs)}")
        kind, ids, prepare = self._prompt_ids("forward", input_ids, inputs_embeds, attention_mask, prepare)
        mask = np.ones_like(ids) if attention_mask is None else _attention_mask(attention_mask, ids)
        self._check_prompts(ids, mask)
        if ids.shape[0] > self.rbln_config.batch_size:
            raise ValueError(
                f"batch of {ids.shape[0]} sequences exceeds the compiled batch_size {self.rbln_config.batch_size}"
            )
        if int(mask.sum(axis=1).max()) > self.max_seq_len:
            raise ValueError(
                f"prompt of {int(mask.sum(axis=1).max())} tokens exceeds max_seq_len {self.max_seq_len}"
            )
        if position_ids is not None:
            want = np.maximum(np.cumsum(mask, axis=1) - 1, 0) * mask
            got = _to_numpy(position_ids)[1].reshape(ids.shape) * mask
            if (got != want).any():
                b, p = np.argwhere(got != want)[0]
                raise NotImplementedError(
                    f"position_ids[{b}, {p}] = {got[b, p]}: only the real tokens' own positions "
                    f"({want[b, p]} there; 0, 1, 2, ... after left padding) are supported"
                )
        extras = prepare(ids, mask)() if prepare is not None else [{}] * ids.shape[0]
        rt = self.runtime
        rt.reset()
        logits, hidden = [], []
        for b in range(ids.shape[0]):
            keep = mask[b].astype(bool)
            collect = [] if lm.output_hidden_states else None
            logits.append(rt.prefill(b, ids[b][keep], hidden_states=collect, **extras[b]))
            hidden.append(collect)
        rt.reset()
        out = np.stack(logits)[:, None]  # (B, 1, V): logits_to_keep = 1
        states = None
        if lm.output_hidden_states:
            t = ids.shape[1]
            states = []
            for layer in range(len(hidden[0])):
                x = np.zeros((ids.shape[0], t, rt.c.hidden_size), np.float32)
                for b in range(ids.shape[0]):
                    x[b, mask[b].astype(bool)] = hidden[b][layer]
                states.append(_from_float(kind, x))
            states = tuple(states)
        return CausalLMOutput(logits=_from_float(kind, out), hidden_states=states)

    def _forward_prepare(self, kwargs, embeds: bool):
        """Extra forward inputs of a subclass (the image model's pixel_values), popped from
        ``kwargs``, as ``_generate``'s ``prepare``; None when there are none (``embeds``: the
        prompt comes as inputs_embeds)."""
        return None


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
        self.model_dir = self.model_save_dir = directory
        self.model_config = config
        self.rbln_config = rbln_config
        self.generation_config = generation_config_of(generation_config)
        self.runtime = build_runtime(config, rbln_config, device_weights)
        self.max_seq_len = self.runtime.max_seq_len
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
        weights.update(lora_device_weights(config, rbln.lora_config))
        return cls(directory, config, rbln, weights, gen)

    @classmethod
    def _from_compiled(cls, directory, config, rbln, gen, weights):
        return cls(directory, config, rbln, weights, gen)  # a tied LM head saved earlier is ignored

    @classmethod
    def _compiled_fields(cls, rbln) -> dict:
        fields = {f: getattr(rbln, f) for f in ("batch_size", "max_seq_len", "prefill_chunk_size")}
        fields.update({f: getattr(rbln, f) for f in GRAPH_FIELDS + ATTENTION_FIELDS})
        fields["lora_config"] = rbln.to_dict()["lora_config"]  # the adapters are in the compiled weights
        return {**fields, "npu": rbln.npu_config}  # the chip itself, however it was named

    def _config_json(self) -> dict:
        return self.model_config.raw

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        return self._generate(input_ids, attention_mask, generation_config, kwargs)


def generation_config_of(d: dict):
    """``model.generation_config`` from generation_config.json's dict (hf_compat)."""
    return generation_config(d)


def _check_dtype(dtype, torch_dtype) -> None:
    """``dtype`` / ``torch_dtype`` of from_pretrained: one of them, a float dtype transformers
    names (or "auto"). Weights are read as stored and rounded by the chip's ``numerics``."""
    if dtype is not None and torch_dtype is not None:
        raise ValueError("pass dtype or torch_dtype (its older name), not both")
    value = dtype if dtype is not None else torch_dtype
    if value is None:
        return
    name = value if isinstance(value, str) else str(value).removeprefix("torch.")
    if name not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {value!r}: expected 'auto', float32, bfloat16 or float16")


def _from_float(kind, arr):
    """Float outputs (logits, hidden states) in the kind of the inputs (torch, NumPy; lists
    get NumPy)."""
    if kind == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(arr))
    return arr


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
