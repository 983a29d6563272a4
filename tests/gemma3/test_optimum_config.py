"""The rbln_config surface as Optimum RBLN's: every field, its default, its validation and error
class, the constructor order, None as the default, reading Optimum RBLN's rbln_config.json, and
RBLNAutoConfig. (No model is built here: the fields' effects on a model are in
test_optimum_model.py.)"""

import json
import logging

import pytest

from gemma3 import (
    RBLNAutoConfig,
    RBLNGemma3ForCausalLMConfig,
    RBLNGemma3ForConditionalGenerationConfig,
    RBLNSiglipVisionModelConfig,
)
from gemma3.rbln_config import RBLN_NPU_NAMES, normalize
from npu_emulator import PRESETS

C = RBLNGemma3ForCausalLMConfig
M = RBLNGemma3ForConditionalGenerationConfig

# Every field of the causal LM config and its default (Optimum RBLN's, plus ours: mode, numerics).
DEFAULTS = dict(
    batch_size=1,
    max_seq_len=None,
    use_inputs_embeds=False,
    use_attention_mask=True,  # always True for Gemma3
    use_position_ids=True,  # always True for Gemma3
    attn_impl=None,  # resolved against max_seq_len: eager
    kvcache_partition_len=None,
    kvcache_block_size=None,
    kvcache_num_blocks=None,
    quantization={},
    lora_config=None,
    prefill_chunk_size=256,
    image_prefill_chunk_size=None,
    decoder_batch_sizes=[1],
    cache_impl="static",
    sliding_window=None,
    sliding_window_layers=[],
    phases=["prefill", "decode"],
    logits_to_keep=1,
    output_hidden_states=False,
    npu="atom",
    tensor_parallel_size=None,
    num_devices=None,
    backend=None,
    create_runtimes=None,
    device=None,
    device_map=None,
    activate_profiler=None,
    timeout=None,
    optimize_host_memory=None,
    mode="fast",
    numerics="bf16",
)


def test_every_field_has_its_default_and_none_means_the_default():
    assert {k: getattr(C(), k) for k in DEFAULTS} == DEFAULTS
    assert C(**{k: None for k in DEFAULTS}) == C()
    assert C(None, None, None, None) == C()


def test_positional_order_is_optimum_rblns():
    c = C(True, True, 128, 4)
    assert (c.use_position_ids, c.use_attention_mask, c.prefill_chunk_size, c.image_prefill_chunk_size) == (
        True,
        True,
        128,
        4,
    )
    with pytest.raises(TypeError, match=r"at most 4 positional arguments \(use_position_ids"):
        C(True, True, 128, 4, 1)
    m = M(2, {"image_size": 32}, {"max_seq_len": 1024})
    assert (m.batch_size, m.vision_tower.image_size, m.language_model.max_seq_len) == (2, 32, 1024)
    v = RBLNSiglipVisionModelConfig(1, 896)
    assert (v.batch_size, v.image_size) == (1, 896)


def test_unknown_keywords_are_value_errors():
    with pytest.raises(ValueError, match=r"Unexpected arguments: \['warp_size'\]"):
        C(warp_size=32)
    with pytest.raises(ValueError, match=r"language_model: Unexpected arguments: \['nope'\]"):
        M(language_model={"nope": 1})


def test_gemma3_forces_attention_mask_and_position_ids_as_optimum_rbln():
    c = C(use_attention_mask=False, use_position_ids=False)
    assert c.use_attention_mask is True and c.use_position_ids is True


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"attn_impl": "sdpa"}, ValueError, r"Unknown `attn_impl` : sdpa"),
        (
            {"attn_impl": "eager", "max_seq_len": 65536},
            ValueError,
            r"`max_seq_len` is set to 65536, which exceeds the limit of 32768 for 'eager'",
        ),
        (
            {"kvcache_partition_len": 4096, "max_seq_len": 4096},
            ValueError,
            r"`max_seq_len` \(4096\) must be a multiple of `kvcache_partition_len` \(4096\)",
        ),
        (
            {"kvcache_partition_len": 2048, "max_seq_len": 8192},
            ValueError,
            r"`kvcache_partition_len` \(2048\) is out of the supported range",
        ),
        (
            {
                "attn_impl": "flash_attn",
                "kvcache_partition_len": 4096,
                "max_seq_len": 8192,
                "kvcache_block_size": 1024,
            },
            ValueError,
            r"the `kvcache_block_size` \(1024\) must always be set equal to the `kvcache_partition_len` 4096",
        ),
        (
            {"kvcache_block_size": 128, "max_seq_len": 1024},
            ValueError,
            r"When using 'eager attention', the `kvcache_block_size` \(128\) must always be set equal to the `max_seq_len` 1024",
        ),
        ({"kvcache_num_blocks": 0}, ValueError, "kvcache_num_blocks must be a positive integer, got 0"),
        ({"phases": "decode"}, ValueError, r"`phases` must be a list\."),
        (
            {"phases": ["prefill", "train"]},
            ValueError,
            r"All elements in `phases` must be of type `PhaseType`",
        ),
        ({"logits_to_keep": 2}, NotImplementedError, r"`logits_to_keep` > 1 is currently not supported"),
        ({"logits_to_keep": -1}, ValueError, "logits_to_keep must be a non-negative integer, got -1"),
        (
            {"batch_size": 2, "decoder_batch_sizes": [4]},
            ValueError,
            r"Decoder batch size \(4\) must be less than or equal to the runtime batch size \(2\)",
        ),
        ({"decoder_batch_sizes": []}, ValueError, r"decoder_batch_sizes must be a non-empty list, got \[\]"),
        (
            {"cache_impl": "paged"},
            ValueError,
            r"cache_impl must be one of \['static', 'sliding_window', 'hybrid'\]",
        ),
        (
            {"sliding_window_layers": [0, -1]},
            ValueError,
            r"sliding_window_layers must be a list of layer indices",
        ),
        (
            {"quantization": {"format": "gptq"}},
            ValueError,
            r"Invalid format: gptq, supported format are: \['rbln'\]",
        ),
        ({"quantization": {"weights": "int3"}}, ValueError, r"Invalid weights: int3"),
        (
            {"quantization": {"weights": "fp16", "activations": "fp16"}},
            ValueError,
            "weights and activations of QuantizationConfig cannot be both fp16",
        ),
        (
            {"quantization": {"precision": "w4a16", "weights": "int8"}},
            ValueError,
            "`precision` and `weights` or `activations` cannot be set at the same time",
        ),
        ({"quantization": {"precision": "w8a8"}}, ValueError, "Invalid precision: w8a8"),
        ({"tensor_parallel_size": 0}, ValueError, "tensor_parallel_size must be a positive integer, got 0"),
        (
            {"tensor_parallel_size": 2, "num_devices": 4},
            ValueError,
            "tensor_parallel_size 2 and num_devices 4 differ",
        ),
        ({"device": -1}, ValueError, r"device must be a device id \(int >= 0\) or a list of them, got -1"),
        ({"device": [0, "1"]}, ValueError, r"device must be a device id"),
        ({"device_map": [0]}, ValueError, "device_map must be a dict, got list"),
        ({"timeout": 0}, ValueError, "timeout must be a positive integer, got 0"),
        ({"create_runtimes": "yes"}, ValueError, "create_runtimes must be a bool or None, got 'yes'"),
        ({"use_inputs_embeds": 1.0}, ValueError, "use_inputs_embeds must be a bool or None, got 1.0"),
        (
            {"cls_name": "RBLNLlamaForCausalLMConfig"},
            ValueError,
            r"cls_name 'RBLNLlamaForCausalLMConfig' is not",
        ),
    ],
)
def test_bad_values_raise_optimum_rblns_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        C(**kwargs)


def test_attention_defaults_resolve_as_optimum_rbln():
    assert C().attention(1024) == ("eager", None, 1024)
    assert C(attn_impl="flash_attn").attention(32768) == ("flash_attn", 16384, 16384)
    # a partition length switches eager to flash_attn, and the block follows the partition
    assert C(kvcache_partition_len=4096).attention(8192) == ("flash_attn", 4096, 4096)
    with pytest.raises(ValueError, match=r"must be a multiple of `kvcache_partition_len` \(16384\)"):
        C(attn_impl="flash_attn", max_seq_len=16384)  # checked at once when max_seq_len is known


def test_logits_to_keep_zero_means_one_and_decoder_batch_sizes_are_completed(caplog):
    assert C(logits_to_keep=0).logits_to_keep == 1  # Optimum RBLN: `logits_to_keep or 1`
    with caplog.at_level(logging.WARNING, logger="gemma3.rbln_config"):
        c = C(batch_size=4, decoder_batch_sizes=[1, 2])
    assert c.decoder_batch_sizes == [4, 2, 1]  # the batch size appended, larger first
    assert "Appending the model's batch size to the decoder batch size" in caplog.text
    no_decode = C(phases=["prefill"], decoder_batch_sizes=[1])
    assert no_decode.decoder_batch_sizes is None and not no_decode.can_generate


def test_quantization_is_checked_and_normalised():
    assert C(quantization={"precision": "w4a16"}).quantization == {
        "format": "rbln",
        "weights": "int4",
        "activations": "fp16",
        "kv_caches": "fp16",
    }
    assert C(quantization={}).quantization == {}


def test_npu_names_map_to_presets_and_unknown_ones_are_listed():
    for name in ("RBLN-CA02", "RBLN-CA12", "RBLN-CA15", "RBLN-CA22", "RBLN-CA25", "RBLN-CR03"):
        assert name in RBLN_NPU_NAMES
        assert (
            C(npu=name).npu_config is PRESETS[RBLN_NPU_NAMES[name]] and C(npu=name).npu == name
        )  # saved as given
    assert C(npu="RBLN-CA15").npu_config is C(npu="RBLN-CA12").npu_config  # one chip, two form factors
    with pytest.raises(
        ValueError,
        match=r"unknown NPU 'RBLN-CA99'; known: our presets \['atom', 'rbln-ca02', .*'tiny'\] and Optimum RBLN's names \['RBLN-CA02'",
    ):
        C(npu="RBLN-CA99")
    m = M(npu="RBLN-CA12", language_model={"npu": "rbln-ca12"})  # one chip, however named
    assert m.language_model.npu_config is PRESETS["rbln-ca12"]


def test_runtime_only_fields_are_stored_and_saved(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gemma3.rbln_config"):
        c = C(
            create_runtimes=False,
            device=[0],
            device_map={"prefill": 0},
            activate_profiler=True,
            timeout=30,
            optimize_host_memory=True,
        )
    assert "`optimize_host_memory` is deprecated" in caplog.text
    c.save(tmp_path)
    back = C.load(tmp_path)
    assert (back.create_runtimes, back.device, back.device_map, back.activate_profiler, back.timeout) == (
        False,
        [0],
        {"prefill": 0},
        True,
        30,
    )


OPTIMUM_FILE = {  # an image+text rbln_config.json as Optimum RBLN writes it
    "cls_name": "RBLNGemma3ForConditionalGenerationConfig",
    "optimum_rbln_version": "0.9.3",
    "_torch_dtype": "float32",
    "_compile_cfgs": [],
    "batch_size": 1,
    "vision_tower": {
        "cls_name": "RBLNSiglipVisionModelConfig",
        "optimum_rbln_version": "0.9.3",
        "_torch_dtype": "float32",
        "_compile_cfgs": [{"compiled_model_name": "model", "input_info": [], "npu": "RBLN-CA25"}],
        "batch_size": 1,
        "image_size": 896,
        "interpolate_pos_encoding": False,
        "output_hidden_states": False,
        "output_attentions": False,
    },
    "language_model": {
        "cls_name": "RBLNGemma3ForCausalLMConfig",
        "optimum_rbln_version": "0.9.3",
        "_torch_dtype": "float32",
        "_compile_cfgs": [],
        "batch_size": 1,
        "max_seq_len": 32768,
        "use_inputs_embeds": True,
        "use_position_ids": True,
        "use_attention_mask": True,
        "quantization": {},
        "lora_config": None,
        "attn_impl": "flash_attn",
        "kvcache_partition_len": 16384,
        "kvcache_block_size": 16384,
        "prefill_chunk_size": 256,
        "kvcache_num_blocks": 2,
        "cache_impl": "hybrid",
        "sliding_window": 1024,
        "sliding_window_layers": [0, 1, 2, 3, 4],
        "phases": ["prefill", "image_prefill", "decode"],
        "logits_to_keep": 1,
        "decoder_batch_sizes": [1],
        "image_prefill_chunk_size": 256,
    },
}


def test_reads_the_rbln_config_json_optimum_rbln_writes(tmp_path):
    (tmp_path / "rbln_config.json").write_text(json.dumps(OPTIMUM_FILE))
    m = M.load(tmp_path, rbln_language_model={"max_seq_len": 65536})
    lm = m.language_model
    assert (lm.attn_impl, lm.kvcache_partition_len, lm.use_inputs_embeds, lm.cache_impl) == (
        "flash_attn",
        16384,
        True,
        "hybrid",
    )
    assert lm.max_seq_len == 65536 and lm.optimum_rbln_version == "0.9.3" and m.vision_tower.image_size == 896
    auto = RBLNAutoConfig.load(tmp_path)
    assert isinstance(auto, M) and auto.language_model.max_seq_len == 32768
    assert RBLNAutoConfig.load_from_dict(OPTIMUM_FILE["language_model"]) == lm.__class__(
        **{**OPTIMUM_FILE["language_model"], "cls_name": None}
    )
    (tmp_path / "rbln_config.json").write_text(
        json.dumps({"_meta": {}, "cls_name": "RBLNGemma3ForCausalLMConfig"})
    )
    with pytest.raises(RuntimeError, match="is an old version. Please recompile the model"):
        C.load(tmp_path)


def test_load_of_another_class_warns_as_optimum_rbln(tmp_path, caplog):
    C(max_seq_len=512).save(tmp_path)
    with caplog.at_level(logging.WARNING, logger="gemma3.rbln_config"):
        with pytest.raises(ValueError, match=r"Unexpected arguments"):  # then its fields do not fit
            M.load(tmp_path)
    assert (
        "Expected RBLNGemma3ForConditionalGenerationConfig, but got RBLNGemma3ForCausalLMConfig."
        in caplog.text
    )


def test_auto_config_needs_a_known_cls_name():
    assert isinstance(RBLNAutoConfig(cls_name="RBLNGemma3ForCausalLMConfig", max_seq_len=64), C)
    with pytest.raises(ValueError, match="`cls_name` is required."):
        RBLNAutoConfig(max_seq_len=64)
    with pytest.raises(ValueError, match=r"Configuration for RBLNLlamaForCausalLMConfig not found"):
        RBLNAutoConfig.load_from_dict({"cls_name": "RBLNLlamaForCausalLMConfig"})


def test_normalize_is_the_one_way_in(tmp_path):
    C(max_seq_len=512, batch_size=2).save(tmp_path)
    for given in (
        {"max_seq_len": 512, "batch_size": 2},
        C(max_seq_len=512, batch_size=2),
        tmp_path,
        str(tmp_path),
    ):
        cfg, rest = normalize(C, given, {"rbln_prefill_chunk_size": 128, "export": True})
        assert (cfg.max_seq_len, cfg.batch_size, cfg.prefill_chunk_size, rest) == (
            512,
            2,
            128,
            {"export": True},
        )
    with pytest.raises(TypeError, match="rbln_config must be a dict, a NPUGemma3ForCausalLMConfig or a path"):
        normalize(C, 42)


def test_vision_tower_fields():
    v = RBLNSiglipVisionModelConfig(output_hidden_states=True, output_attentions=True)
    assert (v.batch_size, v.interpolate_pos_encoding, v.output_hidden_states, v.output_attentions) == (
        1,
        False,
        True,
        True,
    )
    with pytest.raises(
        NotImplementedError, match="interpolate_pos_encoding: images other than the checkpoint's"
    ):
        RBLNSiglipVisionModelConfig(interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="batch_size must be 1 for the vision tower"):
        RBLNSiglipVisionModelConfig(2)
