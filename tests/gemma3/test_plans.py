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


def test_planning_every_shape_leaves_nothing_to_trace(tmp_path):
    """After ``plan_every_shape`` (the default model's compile), a generate with any prompt
    length and any number of new tokens plans nothing new, on one device and on two."""
    import numpy as np

    from gemma3 import NPUGemma3ForCausalLM
    from tests.gemma3.oracle import tiny_model

    tiny_model(tmp_path, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    for tp in (1, 2):
        model = NPUGemma3ForCausalLM.from_pretrained(
            tmp_path,
            rbln_npu="tiny",
            rbln_max_seq_len=128,
            rbln_prefill_chunk_size=64,
            rbln_tensor_parallel_size=tp,
        )
        model.runtime.plan_every_shape()
        npus = [w.npu for w in model.runtime.devices.workers] if tp > 1 else [model.runtime.npu]
        planned = [set(npu._plans) for npu in npus]
        for n, new in ((5, 3), (64, 2), (70, 50), (127, 1)):
            ids = (np.arange(n) % 290 + 3)[None]
            model.generate(ids, max_new_tokens=new)
        assert [set(npu._plans) - p for npu, p in zip(npus, planned)] == [set()] * len(npus)
