"""Worked example: a double-buffered tiled matmul kernel on the emulated NPU."""

import numpy as np

from npu_emulator import NPU, Kernel, tiles


def emit(k, a, b):
    """out (M, N) = a (M, K) @ b (K, N) on engine 0, tiles streamed through two buffers."""
    cfg = k.config  # tile sizes come from the chip, never from bare numbers
    (m, kk), n = a.shape, b.shape[1]
    tm, tk, tn = min(m, cfg.matmul_max_m), min(kk, cfg.matmul_max_k), min(n, cfg.matmul_max_n)
    out = k.output((m, n), name="out")  # DRAM, device dtype (bf16)
    a_t = [k.alloc((tm, tk), name=f"a{i}") for i in range(2)]  # local SRAM of engine 0
    b_t = [k.alloc((tk, tn), name=f"b{i}") for i in range(2)]
    acc = k.alloc((tm, tn), "fp32", name="acc")  # the matrix unit accumulates in fp32
    o_t = k.alloc((tm, tn), name="o")
    step = 0
    for m0, ml in tiles(m, tm):
        for n0, nl in tiles(n, tn):
            for i, (k0, kl) in enumerate(tiles(kk, tk)):
                s = step % 2  # load into buffer s while the matrix unit works on the other
                k.dma(a_t[s][:ml, :kl], a[m0 : m0 + ml, k0 : k0 + kl], queue=0)
                k.dma(b_t[s][:kl, :nl], b[k0 : k0 + kl, n0 : n0 + nl], queue=1)
                k.matmul(acc[:ml, :nl], a_t[s][:ml, :kl], b_t[s][:kl, :nl], accumulate=i > 0)
                step += 1
            k.vector("copy", o_t[:ml, :nl], acc[:ml, :nl])  # fp32 -> bf16 on the vector unit
            k.dma(out[m0 : m0 + ml, n0 : n0 + nl], o_t[:ml, :nl], queue=2)
    return out


tiled_matmul = Kernel("tiled_matmul", emit, fast=lambda a, b: a @ b)

if __name__ == "__main__":
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 300), dtype=np.float32)
    b = rng.standard_normal((300, 150), dtype=np.float32)
    npu = NPU("tiny", mode="tile")  # every instruction executed and checked
    out, report = npu.run(tiled_matmul, a, b, trace="tiled_matmul_trace.json")
    print("out[:2, :4] =", out[:2, :4])
    print("max |out - a @ b| =", float(np.abs(out - a @ b).max()), "(bf16 inputs and output)")
    print(report)
    print("trace written to tiled_matmul_trace.json: open it at https://ui.perfetto.dev")
