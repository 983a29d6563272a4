"""attn_impl="flash_attn" on a tiny random model: the tokens of eager attention and of
transformers, and decode cycles that differ from eager's exactly as the partitions predict.

Optimum RBLN's flash_attn minimums (partitions of 4 096 positions, max_seq_len 8 192) are
lowered here with our emulation-only field ``relax_flash_attn_limits``: partitions of 64
positions in a 256-position cache, so that a 60-token prompt crosses a partition boundary
within a few decode steps."""

import math

import numpy as np
import pytest

from gemma3 import RBLNGemma3ForCausalLM, RBLNGemma3ForCausalLMConfig
from npu_emulator import NPU
from npu_kernels.attention_decode import attention_decode, decode_kv_tile
from npu_kernels.attention_decode_flash import attention_decode_flash
from tests.gemma3.oracle import tiny_model

torch = pytest.importorskip("torch", reason="the oracle extra is not installed")

NEW = 12
PART = 64
CHIP = dict(rbln_npu="tiny", rbln_numerics="fp32")
EAGER = dict(prefill_chunk_size=64, max_seq_len=256, batch_size=2)
FLASH = dict(EAGER, attn_impl="flash_attn", kvcache_partition_len=PART, relax_flash_attn_limits=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("flash")
    hf = tiny_model(root / "ckpt")
    eager = RBLNGemma3ForCausalLM.from_pretrained(root / "ckpt", rbln_config=EAGER, **CHIP)
    flash = RBLNGemma3ForCausalLM.from_pretrained(root / "ckpt", rbln_config=FLASH, **CHIP)
    return root, hf, eager, flash


def batch(lengths, seed=0):
    """Left-padded random prompts of the given lengths: (ids, attention mask)."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids, mask = np.zeros((len(lengths), width), np.int64), np.zeros((len(lengths), width), np.int64)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = rng.integers(3, 300, n)
        mask[b, width - n :] = 1
    return ids, mask


def attention_cycles(npu, kernel, b, c, slots, length, **consts):
    """Cycles of one decode attention of the global layer reading ``length`` slots (the
    host's mask arrives in the device dtype, as every input the model passes)."""
    cache = ((b, c.num_key_value_heads, slots, c.head_dim), "bf16")
    sig = [((b, c.num_attention_heads, c.head_dim), "bf16"), cache, cache, ((b, length), "bf16")]
    return npu.plan(kernel, sig, dict(scale=c.query_pre_attn_scalar**-0.5, **consts)).report.cycles


def test_flash_attn_tokens_equal_eager_and_transformers(models):
    _, hf, eager, flash = models
    ids, mask = batch([60, 45])  # the longer prompt crosses the partition at 64 while decoding
    out_f = flash.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    out_e = eager.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    with torch.no_grad():
        ref = hf.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        ).numpy()
    np.testing.assert_array_equal(out_f, ref)
    np.testing.assert_array_equal(out_e, ref)


def test_decode_cycles_differ_from_eager_as_the_partitions_predict(models):
    _, hf, eager, flash = models
    ids, mask = batch([60, 45], seed=1)
    c = hf.config
    rt = flash.runtime
    tile, slots = decode_kv_tile(rt.npu.config), rt.global_slots
    assert flash.rbln_config.attention(256) == ("flash_attn", PART, PART) and rt.partition == PART
    flash.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    kernels = [r.name for r in rt.cost["decode"].reports]
    globals_ = [i for i in range(c.num_hidden_layers) if not rt.c.is_sliding(i)]
    steps = NEW - 1  # the first new token comes from prefill
    # Only the global layers' attention changes kernel: sliding layers stay eager (as Optimum
    # RBLN's sliding-window op).
    assert kernels.count("attention_decode_flash") == steps * len(globals_)
    assert kernels.count("attention_decode") == steps * (c.num_hidden_layers - len(globals_))
    flash_cycles = flash.last_report.decode.cycles
    eager.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    eager_cycles = eager.last_report.decode.cycles
    # Step k of the 60-token sequence is at position 60 + k: eager reads the KV tiles up to it,
    # flash the whole partitions (64 slots, then 128 once position 64 is reached).
    npu = NPU(rt.npu.config)
    predicted = 0
    lengths = set()
    for k in range(steps):
        reach = 60 + k + 1
        length_f = math.ceil(reach / PART) * PART
        length_e = math.ceil(reach / tile) * tile
        lengths.add(length_f)
        f = attention_cycles(npu, attention_decode_flash, 2, c, slots, length_f, partition=PART)
        e = attention_cycles(npu, attention_decode, 2, c, slots, length_e)
        predicted += len(globals_) * (f - e)
    assert lengths == {64, 128}  # one partition, then two; never the whole 256-slot cache
    assert flash_cycles - eager_cycles == predicted
    # Skipping the partitions past the furthest position is what flash attention saves.
    whole = attention_cycles(npu, attention_decode_flash, 2, c, slots, slots, partition=PART)
    assert whole > attention_cycles(npu, attention_decode_flash, 2, c, slots, 2 * PART, partition=PART)


def test_save_and_load_keep_flash_attn(models, tmp_path):
    root, _, _, flash = models
    ids, mask = batch([30, 70], seed=2)
    want = flash.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    cycles = flash.last_report.decode.cycles
    flash.save_pretrained(tmp_path / "compiled")
    back = RBLNGemma3ForCausalLM.from_pretrained(tmp_path / "compiled", export=False)
    assert back.runtime.partition == PART and back.rbln_config.relax_flash_attn_limits
    np.testing.assert_array_equal(
        back.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[]), want
    )
    assert back.last_report.decode.cycles == cycles
    with pytest.raises(ValueError, match=r"was compiled with other \['attn_impl'"):
        RBLNGemma3ForCausalLM.from_pretrained(tmp_path / "compiled", export=False, rbln_attn_impl="eager")


def test_minimums_are_optimum_rblns_unless_relaxed():
    with pytest.raises(ValueError, match=r"\(64\) is out of the supported range for 'flash_attn' \(4096 <="):
        RBLNGemma3ForCausalLMConfig(max_seq_len=256, attn_impl="flash_attn", kvcache_partition_len=PART)
    cfg = RBLNGemma3ForCausalLMConfig(
        max_seq_len=256, kvcache_partition_len=PART, relax_flash_attn_limits=True
    )
    assert cfg.attention(256) == ("flash_attn", PART, PART)
    # The other constraints stay: at least two partitions, dividing max_seq_len, block = partition.
    with pytest.raises(
        ValueError, match=r"`max_seq_len` \(64\) must be a multiple of `kvcache_partition_len`"
    ):
        RBLNGemma3ForCausalLMConfig(
            max_seq_len=PART, kvcache_partition_len=PART, relax_flash_attn_limits=True
        )
    with pytest.raises(ValueError, match=r"must be a multiple of `kvcache_partition_len` \(48\)"):
        RBLNGemma3ForCausalLMConfig(max_seq_len=256, kvcache_partition_len=48, relax_flash_attn_limits=True)
    with pytest.raises(ValueError, match=r"`kvcache_block_size` \(128\) must always be set equal"):
        RBLNGemma3ForCausalLMConfig(
            max_seq_len=256, kvcache_partition_len=PART, kvcache_block_size=128, relax_flash_attn_limits=True
        )
    with pytest.raises(ValueError, match="relax_flash_attn_limits must be a bool or None, got 'yes'"):
        RBLNGemma3ForCausalLMConfig(relax_flash_attn_limits="yes")


def test_a_partition_off_the_kv_tile_is_refused_at_compile(models):
    root = models[0]
    tile = decode_kv_tile(NPU("tiny").config)
    with pytest.raises(
        ValueError, match=rf"kvcache_partition_len 4 is not a multiple of the decode KV tile of tiny \({tile}"
    ):
        RBLNGemma3ForCausalLM.from_pretrained(
            root / "ckpt", rbln_config=dict(FLASH, kvcache_partition_len=4), **CHIP
        )
