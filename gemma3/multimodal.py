"""The image+text facade: ``NPUGemma3ForConditionalGeneration`` (alias
``RBLNGemma3ForConditionalGeneration``), as Optimum RBLN's class and transformers'
``Gemma3ForConditionalGeneration``.

    model = NPUGemma3ForConditionalGeneration.from_pretrained(
        "path/to/gemma3-4b", rbln_config={"language_model": {"max_seq_len": 1024}}
    )
    inputs = Gemma3Processor.from_pretrained("path/to/gemma3-4b")(images=[img], text=prompt, return_tensors="np")
    out = model.generate(**inputs, max_new_tokens=32)
    print(model.last_report.table())   # image encoding, image prefill, text prefill, decode

One chip holds both parts: the SigLIP tower and projector (``gemma3/vision.py``) and the
language model (``gemma3/runtime.py``). ``generate`` encodes every image of the batch (one at a
time), then prefills each sequence: text in chunks of ``prefill_chunk_size``, each image's run of
``mm_tokens_per_image`` soft tokens as one chunk of its projected features, those tokens seeing
each other both ways. Which tokens are an image's is read from ``input_ids`` (runs of the image
token); ``token_type_ids``, when given, must mark exactly those tokens. (transformers, given no
``token_type_ids``, keeps image tokens causal; the model is defined with the bidirectional
image attention, so it is applied whenever there are images.)

Compiled directory: as the text model's (``gemma3/facade.py``), with the vision weights in the
same ``compiled/weights.safetensors`` under ``vision.`` and the processor's files copied along.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from npu_emulator import CycleReport

from .config import Gemma3TextConfig, read_json
from .facade import (
    GRAPH_FIELDS,
    GenerationReport,
    NPUGemma3PreTrainedModel,
    _to_numpy,
    generation_config_of,
)
from .lora import lora_device_weights
from .rbln_config import NPUGemma3ForConditionalGenerationConfig
from .runtime import IMAGE_PREFILL, Gemma3OnNPU
from .tensor_parallel import build_runtime
from .vision import Gemma3VisionSpec, VisionTowerOnNPU, load_vision_weights
from .weights import Checkpoint, text_weights

VISION_PREFIX = "vision."  # the vision weights' names in compiled/weights.safetensors
# transformers' Gemma3Config defaults (config.json files leave out what equals them)
IMAGE_TOKEN_DEFAULT, BOI_DEFAULT, EOI_DEFAULT = 262144, 255999, 256000
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.json")


@dataclass(frozen=True)
class Gemma3ImageTextConfig:
    """An image+text Gemma3 ``config.json`` (model_type ``gemma3``): the language model, the
    vision side, and the image tokens."""

    text: Gemma3TextConfig
    vision: Gemma3VisionSpec
    image_token_id: int  # <image_soft_token>: the rows an image's features replace
    boi_token_id: int  # <start_of_image>
    eoi_token_id: int  # <end_of_image>
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # config.json as read

    @property
    def mm_tokens_per_image(self) -> int:
        return self.vision.mm_tokens_per_image

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> Gemma3ImageTextConfig:
        model_type = d.get("model_type")
        if model_type != "gemma3" or "vision_config" not in d:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not an image+text Gemma3 config (model_type "
                "'gemma3' with a vision_config); load a text-only model with NPUGemma3ForCausalLM"
            )
        text = Gemma3TextConfig.from_dict(d, source)
        vision = Gemma3VisionSpec.from_dict(d, source)

        def token(*keys, default):
            value = next((d[k] for k in keys if d.get(k) is not None), default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{source}: {keys[0]} must be a non-negative integer, got {value!r}")
            return value

        ids = {k: d.get(k, getattr(text, k)) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
        return cls(
            text=text,
            vision=vision,
            image_token_id=token("image_token_index", "image_token_id", default=IMAGE_TOKEN_DEFAULT),
            boi_token_id=token("boi_token_index", "boi_token_id", default=BOI_DEFAULT),
            eoi_token_id=token("eoi_token_index", "eoi_token_id", default=EOI_DEFAULT),
            raw=dict(d),
            **ids,
        )

    @classmethod
    def from_json(cls, path) -> Gemma3ImageTextConfig:
        return cls.from_dict(*read_json(path))


class MultimodalGenerationReport(GenerationReport):
    """Emulated cost and host time of one image+text ``generate`` call, in four phases: image
    encoding (the vision tower and projector, per image), image prefill (the prefill chunks
    holding images' tokens), text prefill (the other chunks) and decode. ``prefill`` is the text
    prefill; ``prompt_tokens`` counts every prompt token, images' included."""

    def __init__(
        self,
        image_encoding: CycleReport | None,
        image_prefill: CycleReport | None,
        text_prefill: CycleReport | None,
        decode: CycleReport | None,
        *,
        images: int,
        image_tokens: int,
        text_tokens: int,
        new_tokens: int,
        host_seconds: dict[str, float],
    ):
        super().__init__(
            text_prefill,
            decode,
            image_tokens + text_tokens,
            new_tokens,
            host_seconds["text prefill"],
            host_seconds["decode"],
        )
        self.image_encoding, self.image_prefill, self.text_prefill = (
            image_encoding,
            image_prefill,
            text_prefill,
        )
        self.images, self.image_tokens, self.text_tokens = images, image_tokens, text_tokens
        self.host_seconds = dict(host_seconds)

    def phases(self):
        h = self.host_seconds
        return [
            ("image encoding", self.image_encoding, self.image_tokens, h["image encoding"]),
            ("image prefill", self.image_prefill, self.image_tokens, h["image prefill"]),
            ("text prefill", self.text_prefill, self.text_tokens, h["text prefill"]),
            ("decode", self.decode, self.new_tokens, h["decode"]),
        ]


class NPUGemma3ForConditionalGeneration(NPUGemma3PreTrainedModel):
    """Gemma3 with images on the emulated NPU (module docstring)."""

    config_class = NPUGemma3ForConditionalGenerationConfig
    hf_model_type = "gemma3"
    hf_class_name = "Gemma3ForConditionalGeneration"

    def __init__(
        self,
        directory: str,
        config: Gemma3ImageTextConfig,
        rbln_config: NPUGemma3ForConditionalGenerationConfig,
        text_weights: dict,
        vision_weights: dict,
        generation_config: dict,
    ):
        self.model_dir = self.model_save_dir = directory
        self.model_config = config
        self.rbln_config = _resolve(config, rbln_config)
        self.generation_config = generation_config_of(generation_config)
        self.runtime = build_runtime(config.text, self.rbln_config.language_model, text_weights)
        self.runtime.check_image_chunk()
        self.vision = VisionTowerOnNPU(config.vision, self.runtime.npu, vision_weights)
        self.max_seq_len = self.runtime.max_seq_len
        self.last_report: MultimodalGenerationReport | None = None
        self._remember_compiled_config()

    # ------------------------------------------------------------------ loading

    @classmethod
    def _read_config(cls, directory) -> Gemma3ImageTextConfig:
        return Gemma3ImageTextConfig.from_json(os.path.join(directory, "config.json"))

    @classmethod
    def _text_parts(cls, config, rbln):
        return config.text, rbln.language_model, "language_model."

    @classmethod
    def _from_checkpoint(cls, directory, config, rbln, gen):
        ckpt = Checkpoint(directory)
        names = text_weights(ckpt, config.text)
        text = Gemma3OnNPU.device_weights(config.text, lambda n: ckpt.float32(names[n]))
        text.update(lora_device_weights(config.text, rbln.language_model.lora_config, image_text=True))
        return cls(directory, config, rbln, text, load_vision_weights(ckpt, config.vision), gen)

    @classmethod
    def _from_compiled(cls, directory, config, rbln, gen, weights):
        vision = {n[len(VISION_PREFIX) :]: a for n, a in weights.items() if n.startswith(VISION_PREFIX)}
        text = {n: a for n, a in weights.items() if not n.startswith(VISION_PREFIX)}
        return cls(directory, config, rbln, text, vision, gen)

    @classmethod
    def _compiled_fields(cls, rbln) -> dict:
        lm = rbln.language_model
        return {
            "batch_size": rbln.batch_size,
            "npu": rbln.npu_config,
            "language_model.max_seq_len": lm.max_seq_len,
            "language_model.prefill_chunk_size": lm.prefill_chunk_size,
            **{f"language_model.{f}": getattr(lm, f) for f in GRAPH_FIELDS},
            "language_model.lora_config": lm.to_dict()["lora_config"],
        }

    def _plan_all(self):
        self.runtime.plan_all()
        self.runtime.plan_images()
        self.vision.plan_all()

    # ------------------------------------------------------------------ saving

    def _config_json(self) -> dict:
        return self.model_config.raw

    def _device_tensors(self) -> dict:
        tensors = super()._device_tensors()
        tensors.update({VISION_PREFIX + n: t for n, t in self.vision.weights.items()})
        return tensors

    def _save_files(self, directory) -> None:
        super()._save_files(directory)
        for name in PROCESSOR_FILES:
            src = os.path.join(self.model_dir, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(directory, name))

    # ------------------------------------------------------------------ generation

    def _token_ids_beyond_vocab(self) -> dict[int, str]:
        return {self.model_config.image_token_id: "the image token"}  # its rows are an image's features

    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        generation_config=None,
        *,
        pixel_values=None,
        token_type_ids=None,
        **kwargs,
    ):
        """As transformers' ``Gemma3ForConditionalGeneration.generate``: ``input_ids`` with
        ``mm_tokens_per_image`` image tokens per image (the processor's output), ``pixel_values``
        (N, C, H, W) for the N images of the whole batch in order, ``token_type_ids`` optional
        (1 at image tokens), and the text model's generation arguments."""
        counts = {"images": 0, "image_tokens": 0, "encode_s": 0.0}
        text_only = pixel_values is None and kwargs.get("inputs_embeds") is not None
        prepare = None if text_only else self._images(pixel_values, token_type_ids, counts)

        def report(prompt_tokens, new_tokens, timer):
            rt = self.runtime
            phases = rt.reports()
            return MultimodalGenerationReport(
                self.vision.report(),
                phases[IMAGE_PREFILL],
                phases["prefill"],
                phases["decode"],
                images=counts["images"],
                image_tokens=counts["image_tokens"],
                text_tokens=prompt_tokens - counts["image_tokens"],
                new_tokens=new_tokens,
                host_seconds={
                    "image encoding": counts["encode_s"],
                    "image prefill": rt.cost[IMAGE_PREFILL].seconds,
                    "text prefill": rt.cost["prefill"].seconds,
                    "decode": timer["decode"],
                },
            )

        return self._generate(input_ids, attention_mask, generation_config, kwargs, prepare, report)

    def _images(self, pixel_values, token_type_ids, counts: dict):
        """The ``prepare(ids, mask)`` of ``_generate`` for these images: checks them against the
        prompts' image tokens, then encodes them when prefill starts; ``counts`` receives the
        number of images, image tokens and the encoding's host seconds."""

        def prepare(ids, mask):
            spans = self.image_spans(ids, mask, token_type_ids)
            n = sum(len(row) for row in spans)
            pixels = self._pixels(pixel_values, n)
            counts.update(images=n, image_tokens=n * self.model_config.mm_tokens_per_image)
            self.vision.reset()
            counts["encode_s"] = 0.0

            def encode():
                t = time.perf_counter()
                features = self.vision.encode(pixels) if n else None
                counts["encode_s"] = time.perf_counter() - t
                out, k = [], 0
                for row in spans:
                    out.append({"images": [(s, features[k + j]) for j, s in enumerate(row)]} if row else {})
                    k += len(row)
                return out

            return encode

        return prepare

    def _forward_prepare(self, kwargs, embeds: bool):
        pixel_values, token_type_ids = kwargs.pop("pixel_values", None), kwargs.pop("token_type_ids", None)
        if embeds and pixel_values is None:
            return None
        return self._images(pixel_values, token_type_ids, {})

    @property
    def language_model(self) -> Gemma3OnNPU:
        """The language model on the chip (Optimum RBLN: its compiled language model)."""
        return self.runtime

    @property
    def vision_tower(self) -> VisionTowerOnNPU:
        """The vision tower and projector on the chip."""
        return self.vision

    def kernel_reports(self) -> list[CycleReport]:
        """The kernel reports of the last ``generate``, phase after phase (image encoding, image
        prefill, text prefill, decode): for ``npu_emulator.trace.write_sequence_trace``."""
        cost = self.runtime.cost
        return (
            list(self.vision.reports)
            + cost[IMAGE_PREFILL].reports
            + cost["prefill"].reports
            + cost["decode"].reports
        )

    def image_spans(self, ids: np.ndarray, mask: np.ndarray, token_type_ids=None) -> list[list[int]]:
        """Where each image's soft tokens start in each sequence's real tokens (the tokens the
        mask keeps). Every run of image tokens must be one image, ``mm_tokens_per_image`` long."""
        c = self.model_config
        size, image = c.mm_tokens_per_image, c.image_token_id
        real = mask.astype(bool)
        is_image = (ids == image) & real
        if token_type_ids is not None:
            types = _to_numpy(token_type_ids)[1]
            if types.size != ids.size:
                raise ValueError(f"token_type_ids {types.shape} must have the shape of input_ids {ids.shape}")
            marked = (types.reshape(ids.shape) == 1) & real
            if (marked != is_image).any():
                b, p = np.argwhere(marked != is_image)[0]
                raise ValueError(
                    f"token_type_ids disagree with input_ids at sequence {b}, position {p}: token "
                    f"{ids[b, p]} has type {types.reshape(ids.shape)[b, p]}; type 1 marks exactly the image "
                    f"tokens (id {image})"
                )
        outside = (ids >= c.text.vocab_size) & real & ~is_image
        if outside.any():
            b, p = np.argwhere(outside)[0]
            raise ValueError(
                f"input_ids[{b}, {p}] = {ids[b, p]} is outside the vocabulary of {c.text.vocab_size} "
                f"tokens and is not the image token {image}"
            )
        spans = []
        for b in range(ids.shape[0]):
            flags = is_image[b][real[b]].astype(np.int8)
            edges = np.diff(np.concatenate([[0], flags, [0]]))
            starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
            for s, e in zip(starts, ends):
                if e - s != size:
                    raise ValueError(
                        f"sequence {b}: a run of {e - s} image tokens (id {image}) at position {s}; each "
                        f"image is {size} of them (mm_tokens_per_image), one run per image, as the "
                        "processor writes them"
                    )
            spans.append([int(s) for s in starts])
        return spans

    def _pixels(self, pixel_values, n: int) -> np.ndarray | None:
        v = self.model_config.vision.vision
        want = (v.num_channels, v.image_size, v.image_size)
        if pixel_values is None:
            if n:
                raise ValueError(
                    f"image count mismatch: the prompts hold {n} image(s) ({n} runs of "
                    f"{self.model_config.mm_tokens_per_image} image tokens) but no pixel_values were given"
                )
            return None
        if hasattr(pixel_values, "detach"):  # a torch tensor
            pixel_values = pixel_values.detach().cpu().float().numpy()
        elif isinstance(pixel_values, (list, tuple)):
            pixel_values = (
                np.stack([np.asarray(p, np.float32) for p in pixel_values]) if pixel_values else None
            )
        x = (
            np.asarray(pixel_values, np.float32)
            if pixel_values is not None
            else np.zeros((0, *want), np.float32)
        )
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(f"pixel_values {x.shape} must be (images, {want[0]}, {want[1]}, {want[2]})")
        if x.shape[0] != n:
            raise ValueError(
                f"image count mismatch: pixel_values holds {x.shape[0]} image(s) but the prompts hold {n} "
                f"({n} runs of {self.model_config.mm_tokens_per_image} image tokens; the processor writes one "
                "per <start_of_image>)"
            )
        return x


def _resolve(config: Gemma3ImageTextConfig, rbln: NPUGemma3ForConditionalGenerationConfig):
    """Check the rbln config against the model and fill in what the model decides: the image
    chunk is one image (``image_prefill_chunk_size`` = mm_tokens_per_image)."""
    tokens, lm, vt = config.mm_tokens_per_image, rbln.language_model, rbln.vision_tower
    if lm.image_prefill_chunk_size is None:
        lm.image_prefill_chunk_size = tokens
    elif lm.image_prefill_chunk_size != tokens:
        raise ValueError(
            f"language_model.image_prefill_chunk_size {lm.image_prefill_chunk_size} must equal "
            f"mm_tokens_per_image {tokens} (an image is prefilled as one chunk)"
        )
    size = config.vision.vision.image_size
    if vt.image_size is not None and vt.image_size not in (size, [size, size]):
        raise ValueError(
            f"vision_tower.image_size {vt.image_size} must equal vision_config.image_size {size}"
        )
    return rbln


RBLNGemma3ForConditionalGeneration = NPUGemma3ForConditionalGeneration

__all__ = [
    "Gemma3ImageTextConfig",
    "MultimodalGenerationReport",
    "NPUGemma3ForConditionalGeneration",
    "RBLNGemma3ForConditionalGeneration",
]
