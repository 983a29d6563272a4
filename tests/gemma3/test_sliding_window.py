"""Any positive sliding_window against transformers, on tiny random Gemma3 models built in code.

Windows that are not a multiple of the decode KV tile (8 on ``tiny``, 64 on ``atom``), tiny
ones (1, 3), ones past max_seq_len; prompts and generations long enough to wrap the ring
(``ceil(window / tile) * tile`` slots) several times; text and image+text, with images of more
soft tokens than the window (transformers windows an image's own tokens on sliding layers).
Greedy tokens must equal transformers' and the logits at every step must be within 1e-4 of the
logit scale of transformers' for the same sequence; the NPU runs with fp32 numerics.

transformers' cached generate is wrong at sliding_window 1: its DynamicSlidingWindowLayer keeps
``full_key_states[:, :, -sliding_window + 1:]``, all the tokens when the window is 1, and the
decode mask (one key long) then broadcasts over all of them. Its uncached forward follows the
mask definition (a query sees only itself), so window 1 takes its tokens from generate with
``use_cache=False``, which runs that forward at every step.
"""

import numpy as np
import pytest

from gemma3 import Gemma3Processor, NPUGemma3ForCausalLM, NPUGemma3ForConditionalGeneration
from npu_kernels.attention_decode import decode_kv_tile
from tests.gemma3.oracle import tiny_model
from tests.gemma3.test_model import oracle_logits, prompt
from tests.gemma3.test_multimodal import BOI, LONG_TEXT, add_image_tokens, build, images
from tests.gemma3.test_multimodal import oracle_logits as image_oracle_logits
from tests.gemma3.tokenizer_fixture import build_tokenizer

torch = pytest.importorskip("torch", reason="the oracle extra is not installed")

TOL = 1e-4
# Two sliding layers: what reaches a token passes through two windows. A global layer (whose
# cache and masks these windows do not change) only costs planning time; one case keeps one.
SLIDING = {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "sliding_attention"]}
MIXED = {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}


def no_eos(hf):
    """transformers generating exactly as we do with eos_token_id=[]: no end token (so none is
    suppressed either, as min_new_tokens would: a greedy eos is a token like any other)."""
    hf.generation_config.eos_token_id = None
    return hf


def close(ours, theirs):
    """Per-step logits (B, V) within TOL of the oracle's logit scale."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        scale = np.abs(b).max()
        err = np.abs(a - b).max() / scale
        assert err <= TOL, f"step {i}: {err:.2e}"


def text_parity(directory, window, lengths, new, npu="tiny", max_seq_len=256, layers=SLIDING):
    hf = tiny_model(directory, sliding_window=window, **layers)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):  # left padding
        ids[b, width - n :] = prompt(n, seed=b)
        mask[b, width - n :] = 1
    model = NPUGemma3ForCausalLM.from_pretrained(
        directory,
        rbln_npu=npu,
        rbln_numerics="fp32",
        rbln_prefill_chunk_size=64,
        rbln_max_seq_len=max_seq_len,
        rbln_batch_size=len(lengths),
    )
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        eos_token_id=[],
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad():
        ref = no_eos(hf).generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            use_cache=window > 1,  # module docstring
        )
    np.testing.assert_array_equal(out.sequences, ref.numpy())
    close(out.logits, oracle_logits(hf, out.sequences, mask, new))
    return model


# (window, prompt lengths, new tokens, layers): on tiny (KV tile 8) every window below is off
# the tile. Each ring (8, 64, 72 or 104 slots) wraps at least twice over the positions, in the
# prefill chunks (64 tokens, some longer than the ring) and again in decode.
TEXT = {
    "window-1": (1, [70], 30, SLIDING),
    "window-3": (3, [70], 30, SLIDING),
    "window-5-batch-of-two-left-padded": (5, [70, 37], 30, SLIDING),
    "window-63": (63, [200], 40, SLIDING),
    "window-65-beside-a-global-layer": (65, [200], 40, MIXED),
    "window-100": (100, [200], 40, SLIDING),
}


@pytest.mark.parametrize("name", list(TEXT))
def test_text_windows_off_the_kv_tile_match_transformers(tmp_path, name):
    window, lengths, new, layers = TEXT[name]
    runtime = text_parity(tmp_path, window, lengths, new, layers=layers).runtime
    ring = -(-window // decode_kv_tile(runtime.npu.config)) * decode_kv_tile(runtime.npu.config)
    assert runtime.ring(0) and runtime.caches[0][0].shape[2] == ring  # layer 0 slides
    assert max(lengths) + new > 2 * ring
    if layers is MIXED:
        assert not runtime.ring(1) and runtime.caches[1][0].shape[2] == 256


@pytest.mark.parametrize(
    "window, max_seq_len",
    [(125, 128), (128, 128), (200, 128)],
    ids=["ring-as-large-as-the-cache", "window-equals-max_seq_len", "window-past-max_seq_len"],
)
def test_windows_near_and_past_max_seq_len_match_transformers(tmp_path, window, max_seq_len):
    """A ring as large as the global cache is no ring: the layer keeps every position and the
    mask keeps the window (here from position 125 on)."""
    model = text_parity(tmp_path, window, [120], max_seq_len - 120, max_seq_len=max_seq_len)
    assert not model.runtime.ring(0)


@pytest.mark.parametrize("window", [3, 100])
def test_text_windows_on_atom_match_transformers(tmp_path, window):
    """atom's KV tile is 64: rings of 64 and 128 slots, wrapped twice or more."""
    prompt_len, new = (70, 30) if window < 64 else (200, 50)
    model = text_parity(tmp_path, window, [prompt_len], new, npu="atom")
    assert model.runtime.caches[0][0].shape[2] == -(-window // 64) * 64


def test_decode_reads_the_ring_in_whole_tiles(tmp_path):
    """The decode attention of a sliding layer reads its whole ring (window 5 on tiny: one tile
    of 8 slots) once it has wrapped: whole tiles, the slots past the window masked."""
    model = text_parity(tmp_path, 5, [30], 4)
    runtime = model.runtime
    runtime.reset()
    runtime.prefill(0, prompt(30))
    runtime.decode(np.array([7]))
    decode = [r for r in runtime.cost["decode"].reports if r.name == "attention_decode"]
    sliding = decode[0]  # layer 0 slides
    c, tile = runtime.c, decode_kv_tile(runtime.npu.config)
    hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    # K and V of one tile of slots, q and the mask, each once, in bf16 (the device dtype:
    # timing uses it whatever the numerics).
    reads = 2 * hkv * tile * hd * 2 + hq * hd * 2 + tile * 2
    assert sliding.bytes_by_path["dram->local"] + sliding.bytes_by_path.get("dram->shared", 0) == reads


# ----------------------------------------------------------------------------- images

# name -> (window, npu, prompt texts, images per text); 16 soft tokens an image, more than windows
# 1, 3 and 5; the long texts wrap the ring (8 to 104 slots on tiny, 64 on atom) three times or
# more, before, between and after the images.
MM16 = dict(image_size=28, patch_size=7, hidden_size=48, num_attention_heads=3)  # 4 x 4 patches
TWO_IMAGES = f"{LONG_TEXT} {BOI} {LONG_TEXT} {BOI} What now?"
THREE_TEXTS = f"{LONG_TEXT} {BOI} {LONG_TEXT} {BOI} {LONG_TEXT} Why?"
IMAGE = {
    "window-1": (1, "tiny", [f"Look: {BOI} and {BOI} Hello world! How are you today?"], [2]),
    "window-3": (3, "tiny", [f"{LONG_TEXT} {BOI} What is it?"], [1]),
    "window-5-batch-of-two": (5, "tiny", [f"One {BOI} here.", f"Two {BOI} and {BOI} there, please."], [1, 2]),
    "window-5-on-atom": (5, "atom", [TWO_IMAGES], [2]),
    "window-63": (63, "tiny", [TWO_IMAGES], [2]),
    "window-65": (65, "tiny", [THREE_TEXTS], [2]),
    "window-100": (100, "tiny", [THREE_TEXTS], [2]),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = build_tokenizer(tmp_path_factory.mktemp("tok"))
    add_image_tokens(d)
    return d


@pytest.mark.parametrize("name", list(IMAGE))
def test_images_longer_than_the_window_match_transformers(tmp_path, tok_dir, name):
    window, npu, texts, counts = IMAGE[name]
    new, tokens = 16, 16
    hf = build(tmp_path, tok_dir, MM16, tokens, dict(sliding_window=window, **SLIDING))
    processor = Gemma3Processor.from_pretrained(tmp_path)
    inputs = processor(images=images(counts), text=texts, return_tensors="np")
    model = NPUGemma3ForConditionalGeneration.from_pretrained(
        tmp_path,
        rbln_npu=npu,
        rbln_numerics="fp32",
        rbln_language_model={"prefill_chunk_size": 64, "max_seq_len": 512},
        rbln_batch_size=len(texts),
    )
    out = model.generate(
        **inputs, max_new_tokens=new, eos_token_id=[], return_dict_in_generate=True, output_logits=True
    )
    pt = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        ref = no_eos(hf).generate(
            **pt,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            use_cache=window > 1,
        )
    np.testing.assert_array_equal(out.sequences, ref.numpy())
    close(out.logits, image_oracle_logits(hf, inputs, out.sequences, new).transpose(1, 0, 2))
    assert model.last_report.image_tokens == sum(counts) * tokens
    ring, tile = model.runtime.caches[0][0].shape[2], decode_kv_tile(model.runtime.npu.config)
    assert ring == -(-window // tile) * tile and inputs["attention_mask"].sum(axis=1).max() + new > 3 * ring


def test_tile_mode_agrees_with_fast_mode_on_a_wrapped_ring(tmp_path):
    """Every kernel of a window-3 model checked instruction by instruction (tile mode): the
    ring of 8 slots wrapped in prefill and decode, same tokens and cycles as fast mode."""
    tiny_model(tmp_path, sliding_window=3, num_hidden_layers=1, layer_types=["sliding_attention"])
    ids = prompt(20)[None]
    outs, reports = [], []
    for mode in ("fast", "tile"):
        model = NPUGemma3ForCausalLM.from_pretrained(
            tmp_path, rbln_npu="tiny", rbln_mode=mode, rbln_prefill_chunk_size=64, rbln_max_seq_len=64
        )
        outs.append(model.generate(ids, max_new_tokens=6))
        reports.append(model.last_report)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert reports[0].prefill.cycles == reports[1].prefill.cycles
    assert reports[0].decode.cycles == reports[1].decode.cycles
