import json
import re

import pytest

from gemma3.rbln_config import NPUGemma3ForCausalLMConfig, RBLNGemma3ForCausalLMConfig, strip_rbln
from npu_emulator import PRESETS, TINY

C = NPUGemma3ForCausalLMConfig


def test_defaults_and_alias():
    c = RBLNGemma3ForCausalLMConfig()
    assert C is RBLNGemma3ForCausalLMConfig
    assert (c.batch_size, c.prefill_chunk_size, c.max_seq_len, c.npu, c.mode) == (
        1,
        256,
        None,
        "atom",
        "fast",
    )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer, got 0"),
        ({"batch_size": 1.5}, ValueError, "batch_size must be a positive integer, got 1.5"),
        ({"max_seq_len": -4}, ValueError, "max_seq_len must be a positive integer, got -4"),
        ({"prefill_chunk_size": 100}, ValueError, "prefill_chunk_size must be divisible by 64, got 100"),
        ({"prefill_chunk_size": 0}, ValueError, "prefill_chunk_size must be a positive integer, got 0"),
        ({"use_attention_mask": "yes"}, ValueError, "use_attention_mask must be a bool or None, got 'yes'"),
        (
            {"max_seq_len": 16384, "kvcache_partition_len": 5000},
            ValueError,
            r"`max_seq_len` \(16384\) must be a multiple of `kvcache_partition_len` \(5000\)",
        ),
        ({"tensor_parallel_size": 0}, ValueError, "tensor_parallel_size must be a positive integer, got 0"),
        (
            {"npu": "h100"},
            ValueError,
            re.escape(f"npu: unknown NPU 'h100'; known: our presets {sorted(PRESETS)}"),
        ),
        ({"mode": "cycle"}, ValueError, "mode must be 'fast' or 'tile', got 'cycle'"),
        ({"warp_size": 32}, ValueError, r"Unexpected arguments: \['warp_size'\]"),
    ],
)
def test_bad_fields_name_field_and_value(kwargs, error, message):
    with pytest.raises(error, match=message):
        C.create(kwargs)


def test_save_load_with_rbln_overrides(tmp_path):
    c = C(batch_size=2, max_seq_len=512, npu=TINY)
    c.save(tmp_path)
    doc = json.loads((tmp_path / "rbln_config.json").read_text())
    assert doc["cls_name"] == "RBLNGemma3ForCausalLMConfig" and doc["npu"]["name"] == "tiny"
    back = C.load(tmp_path, rbln_max_seq_len=1024)
    assert back.max_seq_len == 1024 and back.batch_size == 2 and back.npu_config == TINY
    with pytest.raises(ValueError, match=r"unexpected keyword argument\(s\) \['max_seq_len'\]"):
        C.load(tmp_path, max_seq_len=8)
    with pytest.raises(FileNotFoundError, match="no rbln_config.json"):
        C.load(tmp_path / "nowhere")


def test_from_any_accepts_dicts_instances_and_overrides():
    assert C.from_any({"batch_size": 3}).batch_size == 3
    assert C.from_any(C(batch_size=2), max_seq_len=64).max_seq_len == 64
    fields, rest = strip_rbln({"rbln_batch_size": 4, "export": True})
    assert fields == {"batch_size": 4} and rest == {"export": True}
    with pytest.raises(TypeError, match="rbln_config must be a dict"):
        C.from_any(42)
