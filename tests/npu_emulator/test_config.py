import dataclasses

import pytest

from npu_emulator import ATOM, PRESETS, TINY, NPUConfig, get_preset


def test_atom_preset_matches_the_published_figures():
    assert ATOM.local_sram_bytes == 4 * 2**20
    assert ATOM.shared_sram_bytes == 32 * 2**20
    assert ATOM.dram_bytes == 16 * 2**30
    # 8 engines x 64x32 MACs x 2 FLOP x 1 GHz = 32.8 TFLOPS; 256 B/cycle = 256 GB/s.
    assert ATOM.peak_flops_per_cycle == 8 * 64 * 32 * 2
    assert ATOM.peak_tflops == pytest.approx(32.768)
    assert ATOM.dram_bytes_per_cycle * ATOM.clock_hz == 256e9


def test_presets_by_name():
    assert get_preset("atom") is ATOM and get_preset("tiny") is TINY
    assert set(PRESETS) == {"atom", "tiny"}
    assert get_preset(TINY) is TINY
    with pytest.raises(ValueError, match=r"unknown NPU preset 'tpu'; known presets: \['atom', 'tiny'\]"):
        get_preset("tpu")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ATOM.num_engines = 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_engines": 0}, "NPUConfig.num_engines must be positive, got 0"),
        ({"dram_bytes_per_cycle": -1.0}, "NPUConfig.dram_bytes_per_cycle must be positive"),
        ({"sram_alignment": 48}, "NPUConfig.sram_alignment must be a power of two, got 48"),
        ({"matmul_max_k": 32}, "must hold at least one MAC block (64 x 32)"),
        (
            {"local_sram_bytes": 1000},
            "NPUConfig.local_sram_bytes = 1000 is not a multiple of sram_alignment = 64",
        ),
    ],
)
def test_config_checks_name_field_and_value(change, message):
    with pytest.raises(ValueError) as e:
        ATOM.replace(**change)
    assert message in str(e.value)


def test_config_round_trips_through_a_dict_and_rejects_unknown_fields():
    assert NPUConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match=r"no field\(s\) \['warp_size'\]"):
        NPUConfig.from_dict({**TINY.to_dict(), "warp_size": 32})
