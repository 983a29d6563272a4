import dataclasses

import pytest

from npu_emulator import ATOM, PRESETS, RBLN_NPU_NAMES, TINY, NPUConfig, get_preset, preset_for_rbln_npu


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
    assert set(PRESETS) == {"atom", "tiny", "rbln-ca02", "rbln-ca12", "rbln-ca22", "rbln-ca25", "rebel100"}
    assert get_preset(TINY) is TINY
    with pytest.raises(ValueError, match=r"unknown NPU preset 'tpu'; known presets: \['atom', 'rbln-ca02'"):
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
        ({"dram_efficiency": 0.0}, "NPUConfig.dram_efficiency must be positive, got 0.0"),
        ({"dram_efficiency": 1.2}, "NPUConfig.dram_efficiency is a fraction of the peak, at most 1, got 1.2"),
        ({"matmul_efficiency": 1.5}, "NPUConfig.matmul_efficiency is a fraction of the peak, at most 1"),
        ({"kernel_launch_cycles": -1}, "NPUConfig.kernel_launch_cycles must be >= 0, got -1"),
        ({"host_step_us": -0.5}, "NPUConfig.host_step_us must be >= 0, got -0.5"),
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


def test_ideal_chip_has_no_sustained_rate_losses():
    # atom and tiny keep the datasheet chip: the fitted mechanisms are off.
    for cfg in (ATOM, TINY):
        assert (cfg.dram_efficiency, cfg.matmul_efficiency, cfg.kernel_launch_cycles, cfg.host_step_us) == (
            1.0,
            1.0,
            0,
            0.0,
        )


def test_rbln_presets_are_one_atom_die_with_the_fitted_constants():
    ca25 = PRESETS["rbln-ca25"]
    # One logical device of an ATOM-Max card: 8 engines, 4 MiB local + 32 MiB shared SRAM, 16 GiB
    # GDDR6 at 256 GB/s, 32 TFLOPS FP16.
    assert (ca25.num_engines, ca25.local_sram_bytes, ca25.shared_sram_bytes) == (8, 4 * 2**20, 32 * 2**20)
    assert ca25.dram_bytes == 16 * 2**30 and ca25.dram_bytes_per_cycle * ca25.clock_hz == 256e9
    assert ca25.peak_tflops == pytest.approx(32.768)
    assert 0 < ca25.dram_efficiency < 1 and 0 < ca25.matmul_efficiency < 1 and ca25.host_step_us > 0
    for name in ("rbln-ca02", "rbln-ca12", "rbln-ca22"):
        assert PRESETS[name] == ca25.replace(name=name)
    rebel = PRESETS["rebel100"]
    assert rebel.dram_bytes_per_cycle * rebel.clock_hz == 4.8e12
    assert rebel.peak_tflops == pytest.approx(1048.576)  # half the 2,048 TFLOPS FP8
    assert NPUConfig.from_dict(rebel.to_dict()) == rebel


def test_optimum_rbln_npu_names_map_to_presets():
    assert preset_for_rbln_npu("RBLN-CA25") is PRESETS["rbln-ca25"]
    assert preset_for_rbln_npu(" rbln-cr03 ") is PRESETS["rebel100"]
    assert {get_preset(p).name for p in RBLN_NPU_NAMES.values()} == set(RBLN_NPU_NAMES.values())
    with pytest.raises(ValueError, match=r"unknown RBLN NPU name 'RBLN-CA99'; known: \['RBLN-CA02'"):
        preset_for_rbln_npu("RBLN-CA99")
