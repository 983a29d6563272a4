"""Plan-only tensor parallelism: one device's Megatron-style share of the kernels plus the
collectives, planned over the device group."""

import json
import math
import subprocess
import sys

import pytest

from gemma3.estimate import estimate
from npu_emulator import NPU, TINY, DeviceGroup
from npu_kernels.collectives import all_gather, all_reduce
from npu_kernels.lm_head import lm_head
from npu_kernels.matmul import matmul
from npu_kernels.mlp import geglu_mlp
from tests.gemma3.test_estimate import qwen3 as qwen3_config


def qwen3(path, **overrides):
    """A tiny Qwen3-style config.json (test_estimate's) at ``path``."""
    path.write_text(json.dumps(qwen3_config(**overrides)))
    return path


WORKLOAD = dict(batch=1, prompt_tokens=70, new_tokens=3, chunk=64, max_seq_len=128)


def cycles(kernel, signature, consts=None):
    return NPU(TINY).plan(kernel, signature, consts or {}).report.cycles


@pytest.mark.parametrize("tp, hq, hkv", [(2, 2, 1), (3, 2, 1), (4, 1, 1)])
def test_tp_step_is_one_devices_share_plus_the_collectives(tmp_path, tp, hq, hkv):
    # 4 heads, 2 kv heads: split evenly (tp 2), unevenly (tp 3: the busiest device has 2 heads),
    # kv heads fewer than devices (tp 3, 4: one replicated per device).
    e = estimate(qwen3(tmp_path / "config.json"), "tiny", tp=tp, **WORKLOAD)
    step, layers, bf = e.decode_step, 3, "bf16"
    d, hd, ff, vocab = 64, 16, math.ceil(96 / tp), math.ceil(300 / tp)
    roles = step.roles
    assert roles["qkv_proj"].cycles == layers * cycles(matmul, [((1, d), bf), ((d, (hq + 2 * hkv) * hd), bf)])
    assert roles["o_proj"].cycles == layers * cycles(matmul, [((1, hq * hd), bf), ((hq * hd, d), bf)])
    mlp_sig = [((1, d), bf), ((d, ff), bf), ((d, ff), bf), ((ff, d), bf)]
    assert roles["mlp"].cycles == layers * cycles(geglu_mlp, mlp_sig)
    head_sig = [((1, d), bf), ((d, vocab), bf), ((vocab,), "int32")]
    assert roles["lm_head"].cycles == cycles(lm_head, head_sig, {"softcap": None})
    # An all-reduce after o_proj and after the MLP of every layer, and one after the embedding;
    # on the tiny ring, the ring algorithm.
    group = DeviceGroup(TINY, tp)
    ar = group.plan(all_reduce, [[((1, d), bf)] * tp], {"algorithm": "ring"}).report.cycles
    ag = group.plan(all_gather, [[((1, 2), "fp32")] * tp], {"algorithm": "ring"}).report.cycles
    assert (roles["all_reduce"].calls, roles["all_reduce"].cycles) == (2 * layers + 1, (2 * layers + 1) * ar)
    assert (roles["all_gather"].calls, roles["all_gather"].cycles) == (1, ag)
    assert step.comm_cycles == (2 * layers + 1) * ar + ag
    # The step is the sum of its parts, split three ways.
    assert step.cycles == sum(r.cycles for r in roles.values())
    assert step.cycles == step.compute_cycles + step.memory_cycles + step.comm_cycles
    out = e.to_dict()
    assert out["tp"] == tp and out["link"] == "tiny-ring"
    assert out["phases"]["decode_step"]["share"]["communication"] == pytest.approx(
        step.comm_cycles / step.cycles
    )


def test_tp_1_has_no_collectives_and_keeps_its_cycles(tmp_path):
    path = qwen3(tmp_path / "config.json")
    e = estimate(path, "tiny", **WORKLOAD)
    assert e.link is None and e.decode_step.comm_cycles == 0
    assert "all_reduce" not in e.decode_step.roles
    assert e.decode_step.cycles == e.decode_step.compute_cycles + e.decode_step.memory_cycles


def test_tp_decode_gets_faster_while_communication_grows(tmp_path):
    # An MLP and vocabulary wide enough that a decode step streams its weights (memory bound)
    # on TINY, so shards shorten it while the collectives' share grows.
    path = qwen3(tmp_path / "config.json", vocab_size=1024, intermediate_size=384)
    runs = [estimate(path, "tiny", tp=tp, **WORKLOAD) for tp in (1, 2, 4)]
    steps = [r.decode_step_ms for r in runs]
    shares = [r.decode_step.split()["communication"] for r in runs]
    assert steps[0] > steps[1] > steps[2]
    assert shares[0] == 0 < shares[1] < shares[2]
    assert runs[0].weight_bytes_per_device > runs[1].weight_bytes_per_device > runs[2].weight_bytes_per_device


def test_cli_tp_prints_the_split_and_json(tmp_path):
    path = qwen3(tmp_path / "config.json")
    args = ["--config", str(path), "--npu", "tiny", "--tp", "2", "--prompt-tokens", "70", "--new-tokens", "3"]
    args += ["--chunk", "64", "--max-seq-len", "128", "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "gemma3", "estimate", *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "tensor parallel         2 devices over tiny-ring" in out.stdout
    assert "decode step split" in out.stdout and "all_reduce" in out.stdout
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = estimate(path, "tiny", tp=2, **WORKLOAD).to_dict()
    assert got["tp"] == 2 and got["decode_step_ms"] == pytest.approx(want["decode_step_ms"])
    assert (
        got["decode_step_comm_ms"] == pytest.approx(want["decode_step_comm_ms"])
        and got["decode_step_comm_ms"] > 0
    )


def test_on_a_switch_each_collective_takes_the_faster_algorithm(tmp_path):
    # atom's devices meet at a PCIe switch: a decode step's (1, hidden) all-reduce is latency
    # bound, so the tree's 2 log2 N steps beat the ring's 2 (N - 1).
    e = estimate(qwen3(tmp_path / "config.json"), "atom", tp=4, **WORKLOAD)
    group = DeviceGroup("atom", 4)
    sig = [[((1, 64), "bf16")] * 4]
    ring, tree = (group.plan(all_reduce, sig, {"algorithm": a}).report.cycles for a in ("ring", "tree"))
    assert tree < ring
    assert e.decode_step.roles["all_reduce"].cycles == 7 * tree
