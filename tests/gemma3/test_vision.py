"""Gemma3's vision side (SigLIP tower + multimodal projector) against transformers, on the NPU."""

import json
import os

import numpy as np
import pytest

from gemma3.vision import (
    PROJECTOR_PREFIXES,
    TOWER_PREFIXES,
    Gemma3VisionSpec,
    SiglipVisionConfig,
    VisionTowerOnNPU,
    device_weight_shapes,
    expected_vision_shapes,
    load_vision_weights,
    vision_checkpoint_names,
    vision_device_weights,
    vision_reference,
)
from gemma3.weights import CheckpointError, SafetensorsFile, write_safetensors
from npu_emulator import NPU
from tests.gemma3.oracle import tiny_image_model

TOL = 1e-4  # max |ours - transformers| / max |transformers|, fp32 numerics

# name -> (vision config overrides, mm_tokens_per_image)
CONFIGS = {
    "32-8-mm4": (dict(image_size=32, patch_size=8), 4),  # 4 x 4 patches, pool 2
    "28-7-mm16": (dict(image_size=28, patch_size=7, hidden_size=48, num_attention_heads=3), 16),  # pool 1
    "48-8-mm4": (  # 6 x 6 patches, pool 3; a checkpoint with the (unused) SigLIP head
        dict(
            image_size=48,
            patch_size=8,
            hidden_size=64,
            num_attention_heads=2,
            intermediate_size=80,
            vision_use_head=True,
        ),
        4,
    ),
    "64-8-mm16": (
        dict(image_size=64, patch_size=8, num_hidden_layers=1, num_attention_heads=2),
        16,
    ),  # pool 2
}


class Built:
    def __init__(self, directory, name, seed):
        vision, tokens = CONFIGS[name]
        self.dir = directory
        self.model = tiny_image_model(directory, seed=seed, vision=vision, mm_tokens_per_image=tokens)
        with open(os.path.join(directory, "config.json")) as f:
            self.config = json.load(f)
        self.spec = Gemma3VisionSpec.from_dict(self.config)
        self.file = SafetensorsFile(os.path.join(directory, "model.safetensors"))
        self.names = vision_checkpoint_names(self.file, self.spec)

    def get(self, name):
        return self.file.float32(self.names[name])

    def pixels(self, n=2, seed=0):
        v = self.spec.vision
        rng = np.random.default_rng(seed)
        return rng.uniform(-1, 1, (n, v.num_channels, v.image_size, v.image_size)).astype(np.float32)

    def oracle(self, pixels):
        """(vision_tower(...).last_hidden_state, get_image_features(...)) from transformers."""
        import torch

        with torch.no_grad():
            px = torch.from_numpy(pixels)
            tower = self.model.model.vision_tower(pixel_values=px).last_hidden_state.numpy()
            feats = self.model.model.get_image_features(px)
            feats = getattr(feats, "pooler_output", feats)  # 5.x: an output object; 4.x: a tensor
            return tower, feats.numpy()


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Models are built once per module, on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Built(tmp_path_factory.mktemp(name), name, seed=len(cache))
        return cache[name]

    return get


@pytest.fixture(params=list(CONFIGS))
def built(request, build):
    return build(request.param)


@pytest.fixture
def small(build):
    return build("32-8-mm4")


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def on_npu(b, *, preset="atom", mode="fast", numerics="fp32"):
    npu = NPU(preset, mode=mode, numerics=numerics)
    return VisionTowerOnNPU(b.spec, npu, vision_device_weights(b.spec, b.get))


# ============================================================================ parity


def test_reference_and_npu_match_transformers(built):
    px = built.pixels()
    hf_tower, hf_feats = built.oracle(px)
    spec = built.spec
    n, p, t = px.shape[0], spec.vision.num_patches, spec.mm_tokens_per_image
    assert hf_tower.shape == (n, p, spec.vision.hidden_size)
    assert hf_feats.shape == (n, t, spec.text_hidden_size)

    ref_tower, ref_feats = vision_reference(spec, built.get, px)
    assert rel(ref_tower, hf_tower) < TOL
    assert rel(ref_feats, hf_feats) < TOL

    vt = on_npu(built)
    tower = vt.vision_tower(px)
    feats = vt.project(tower)
    assert tower.shape == hf_tower.shape and feats.shape == hf_feats.shape
    assert tower.dtype == feats.dtype == np.float32
    assert rel(tower, hf_tower) < TOL
    assert rel(feats, hf_feats) < TOL
    np.testing.assert_array_equal(vt.encode(px), feats)  # encode = project(vision_tower(...))


def test_bf16_numerics_stay_close(small):
    b = small
    px = b.pixels(n=1)
    _, hf_feats = b.oracle(px)
    feats = on_npu(b, numerics="bf16").encode(px)
    assert rel(feats, hf_feats) < 3e-2  # bf16 activations and weights: a few roundings of 2^-9


# ============================================================================ cycles and plans


def test_plan_all_covers_every_call_and_costs_add_up(small):
    b = small
    vt = on_npu(b)
    vt.plan_all()
    planned = len(list(vt.npu.plans()))
    assert planned == len(vt.signatures())
    px = b.pixels(n=2)
    vt.encode(px)
    assert len(list(vt.npu.plans())) == planned  # the run needed no plan plan_all did not make
    layers = b.spec.vision.num_hidden_layers
    per_image = 1 + 6 * layers + 2  # patch_embed, 6 kernels a layer, post_layernorm, projector
    assert len(vt.reports) == 2 * per_image
    total = vt.report()
    assert total.name == "image encoding"
    assert total.cycles == sum(r.cycles for r in vt.reports) > 0
    vt.reset()
    assert vt.report() is None


def test_tile_mode_gives_the_same_cycles_and_outputs(small):
    b = small
    px = b.pixels(n=1)
    fast, tile = on_npu(b, preset="tiny"), on_npu(b, preset="tiny", mode="tile")
    out_fast, out_tile = fast.encode(px), tile.encode(px)
    assert [r.cycles for r in tile.reports] == [r.cycles for r in fast.reports]
    assert [r.name for r in tile.reports] == [r.name for r in fast.reports]
    assert rel(out_tile, out_fast) < 1e-5


# ============================================================================ config


def test_spec_reads_config_json_and_round_trips(small):
    b = small
    vc = b.config["vision_config"]
    v = b.spec.vision
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(v, field) == vc[field]
    assert (v.image_size, v.patch_size, v.patches_per_side, v.head_dim) == (32, 8, 4, 8)
    assert b.spec.text_hidden_size == b.config["text_config"]["hidden_size"]
    assert (b.spec.mm_tokens_per_image, b.spec.tokens_per_side, b.spec.pool) == (4, 2, 2)
    assert b.spec.projector_eps == v.layer_norm_eps
    assert Gemma3VisionSpec.from_dict(b.spec.to_dict()) == b.spec
    assert SiglipVisionConfig.from_dict(v.to_dict()) == v
    assert SiglipVisionConfig.from_dict(b.config) == v  # a whole Gemma3 config holds one


def test_missing_fields_take_transformers_defaults():
    spec = Gemma3VisionSpec.from_dict(
        {
            "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                              "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
                              "model_type": "siglip_vision_model", "vision_use_head": False},
            "text_config": {"hidden_size": 2560},
        }
    )  # fmt: skip
    v = spec.vision
    assert (v.num_channels, v.layer_norm_eps, v.hidden_act) == (3, 1e-6, "gelu_pytorch_tanh")
    assert (v.num_patches, spec.mm_tokens_per_image, spec.pool, v.head_dim) == (4096, 256, 4, 72)
    v = SiglipVisionConfig.from_dict({"image_size": [224, 224]})
    assert (v.image_size, v.patch_size, v.hidden_size) == (224, 16, 768)
    v = SiglipVisionConfig(**{**GOOD, "image_size": (32, 32), "patch_size": [8, 8]})  # normalised
    assert (v.image_size, v.patch_size) == (32, 8)


GOOD = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(image_size=30), ValueError, "image_size 30 is not a multiple of patch_size 8"),
        (dict(num_attention_heads=5), ValueError, "hidden_size 32 is not divisible by num_attention_heads 5"),
        (dict(hidden_act="gelu"), NotImplementedError, "hidden_act 'gelu'"),
        (dict(hidden_act="relu"), NotImplementedError, "tanh"),
        (dict(num_hidden_layers=0), ValueError, "num_hidden_layers must be a positive integer"),
        (dict(hidden_size=32.5), ValueError, "hidden_size must be a positive integer"),
        (dict(patch_size=True), ValueError, "patch_size"),
        (dict(image_size=[32, 48]), ValueError, r"image_size \[32, 48\] is not square"),
        (dict(layer_norm_eps=0), ValueError, "layer_norm_eps must be a positive number"),
        (dict(layer_norm_eps="x"), ValueError, "layer_norm_eps"),
        (dict(model_type="clip_vision_model"), ValueError, "model_type 'clip_vision_model'"),
    ],
)
def test_bad_vision_configs_raise_naming_the_field(change, error, match):
    with pytest.raises(error, match=match):
        SiglipVisionConfig.from_dict({**GOOD, **change})


@pytest.mark.parametrize(
    "vision, tokens, text, match",
    [
        ({}, 8, 64, "mm_tokens_per_image 8 is not a perfect square"),
        (
            dict(image_size=48),
            16,
            64,
            r"mm_tokens_per_image 16 \(4 x 4\) does not divide the 6 x 6 patch grid",
        ),
        ({}, 0, 64, "mm_tokens_per_image must be a positive integer"),
        ({}, 4, None, "text_config.hidden_size is missing"),
        ({}, 4, -3, "hidden_size must be a positive integer"),
    ],
)
def test_bad_projector_configs_raise(vision, tokens, text, match):
    d = {"vision_config": {**GOOD, **vision}, "mm_tokens_per_image": tokens, "text_config": {}}
    if text is not None:
        d["text_config"]["hidden_size"] = text
    with pytest.raises(ValueError, match=match):
        Gemma3VisionSpec.from_dict(d)


def test_a_text_only_config_has_no_vision_spec():
    with pytest.raises(ValueError, match="no vision_config"):
        Gemma3VisionSpec.from_dict({"model_type": "gemma3_text", "hidden_size": 64})


# ============================================================================ weights


def test_expected_names_are_what_transformers_writes(small):
    b = small
    expected = expected_vision_shapes(b.spec)
    names = {
        n for n in b.file.tensors if not n.startswith(("language_model.", "model.language_model.", "lm_head"))
    }
    assert names == set(expected)  # no vision tensor missed, none extra (no head in this model)
    for name, shape in expected.items():
        assert tuple(b.file.shape(name)) == shape
    assert b.names == {n: n for n in expected}
    dev = vision_device_weights(b.spec, b.get)
    assert {k: v.shape for k, v in dev.items()} == device_weight_shapes(b.spec)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in dev.values())


class Renamed:
    """A checkpoint view with the vision tensors moved under other prefixes."""

    def __init__(self, f, tower, proj):
        self.f = f
        self.map = {}
        for n in f.tensors:
            if n.startswith("vision_tower."):
                self.map[tower + n[len("vision_tower.") :]] = n
            elif n.startswith("multi_modal_projector."):
                self.map[proj + n[len("multi_modal_projector.") :]] = n
            else:
                self.map[n] = n
        self.directory = "renamed"

    def names(self):
        return list(self.map)

    def shape(self, name):
        return self.f.shape(self.map[name])

    def float32(self, name):
        return self.f.float32(self.map[name])


@pytest.mark.parametrize("tower", TOWER_PREFIXES)
@pytest.mark.parametrize("proj", PROJECTOR_PREFIXES)
def test_every_prefix_layout_loads_the_same_weights(tower, proj, small):
    b = small
    want = load_vision_weights(b.file, b.spec)
    got = load_vision_weights(Renamed(b.file, tower, proj), b.spec)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_missing_and_misshaped_tensors_are_named(tmp_path, small):
    b = small
    tensors = {n: b.file.float32(n) for n in b.file.tensors}
    gone = "vision_tower.encoder.layers.1.self_attn.k_proj.bias"
    flipped = "multi_modal_projector.mm_input_projection_weight"
    del tensors[gone]
    tensors[flipped] = np.ascontiguousarray(tensors[flipped].T)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    f = SafetensorsFile(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        vision_checkpoint_names(f, b.spec)
    msg = str(e.value)
    assert gone in msg and flipped in msg and "(transposed)" in msg


def test_a_checkpoint_without_vision_tensors_is_refused(tmp_path, small):
    b = small
    write_safetensors(
        tmp_path / "model.safetensors", {"language_model.model.norm.weight": np.zeros(4, np.float32)}
    )
    with pytest.raises(CheckpointError, match="vision_tower.embeddings.patch_embedding.weight"):
        load_vision_weights(SafetensorsFile(tmp_path / "model.safetensors"), b.spec)


def test_reference_rejects_bad_pixels(small):
    with pytest.raises(ValueError, match=r"must be \(N, 3, 32, 32\)"):
        vision_reference(small.spec, small.get, np.zeros((3, 32, 32)))


def test_npu_rejects_bad_inputs_and_weights(small):
    b = small
    vt = on_npu(b)
    with pytest.raises(ValueError, match=r"must be \(N, 3, 32, 32\)"):
        vt.encode(np.zeros((1, 3, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"must be \(N, 3, 32, 32\)"):
        vt.encode(np.zeros((3, 32, 32), np.float32))
    w = vision_device_weights(b.spec, b.get)
    with pytest.raises(ValueError, match="missing"):
        VisionTowerOnNPU(b.spec, NPU("tiny"), {k: v for k, v in w.items() if k != "0.qkv"})
    w["0.qkv"] = w["0.qkv"].T
    with pytest.raises(ValueError, match=r"'0.qkv' is \(96, 32\), expected \(32, 96\)"):
        VisionTowerOnNPU(b.spec, NPU("tiny"), w)
