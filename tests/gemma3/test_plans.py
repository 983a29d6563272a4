"""Plans saved with a compiled model load back only onto the chip they were made for."""

import json

import pytest

from gemma3.plans import PLANS, load_plans
from npu_emulator import NPU, TINY


def save(directory, npu_dict):
    (directory / PLANS).write_text(json.dumps({"npu": npu_dict, "plans": []}))


def test_plans_saved_before_the_sustained_rate_fields_still_load(tmp_path):
    old = {k: v for k, v in TINY.to_dict().items() if k not in ("dram_efficiency", "kernel_launch_cycles")}
    save(tmp_path, old)
    assert load_plans(NPU(TINY), tmp_path) == 0


@pytest.mark.parametrize(
    "npu_dict",
    [TINY.replace(dram_efficiency=0.9).to_dict(), {**TINY.to_dict(), "warp_size": 32}, None],
)
def test_plans_for_another_chip_are_refused(tmp_path, npu_dict):
    save(tmp_path, npu_dict)
    with pytest.raises(ValueError, match=r"plans.json: plans were made for another chip configuration"):
        load_plans(NPU(TINY), tmp_path)
