"""The scheduler: instruction stream -> per-unit timelines -> cycles.

An event loop, jitted by Numba, over instructions in program order:

* Every unit (an engine's matrix, vector or special-function unit; a DMA queue) takes its own
  instructions in program order.
* An instruction starts when every instruction it depends on has finished.
* A compute unit runs one instruction at a time for its fixed cost in cycles; an instruction
  that starts the very cycle the previous one on its unit ended skips its ``hide`` cycles
  (the matrix unit's pipeline fill overlaps the previous instruction's drain).
* A DMA queue issues up to ``dma_outstanding`` descriptors; each waits its latency, then moves
  its bytes once the descriptor before it on the queue has finished moving (data in order).
  While moving, a transfer goes at ``min(queue rate, resource rate / transfers on it)`` for
  every shared resource it touches (DRAM, shared SRAM ports, host link): concurrent transfers
  share bandwidth, so the sum never exceeds it.

Times are float cycles (bandwidth sharing makes fractional ends); the report rounds the total up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

INF = np.inf


@numba.njit(cache=True)
def _schedule(
    unit,
    is_dma,
    dur,
    hide,
    nbytes,
    res,
    dep_ptr,
    dep_idx,
    u_ptr,
    u_list,
    unit_is_dma,
    queue_rate,
    res_rate,
    max_outstanding,
):
    n = unit.shape[0]
    n_units = u_ptr.shape[0] - 1
    start = np.full(n, -1.0)
    data_start = np.full(n, -1.0)
    end = np.full(n, -1.0)
    done = np.zeros(n, np.bool_)
    remaining = nbytes.astype(np.float64).copy()
    head = u_ptr[:-1].copy()  # next instruction to start, index into u_list
    first = u_ptr[:-1].copy()  # oldest unfinished (DMA queues)
    busy_end = np.full(n_units, -1.0)  # compute units: end of the running instruction
    last_end = np.full(n_units, -1.0)  # compute units: end of the previous instruction
    busy = np.zeros(n_units)
    busy_since = np.full(n_units, -1.0)
    rate = np.zeros(n_units)
    n_res = res_rate.shape[0]
    res_count = np.zeros(n_res, np.int64)
    t = 0.0
    n_done = 0
    while n_done < n:
        # 1. Start everything that can start at time t.
        changed = True
        while changed:
            changed = False
            for u in range(n_units):
                h = head[u]
                if h == u_ptr[u + 1]:
                    continue
                if unit_is_dma[u]:
                    if h - first[u] >= max_outstanding:
                        continue
                elif busy_end[u] >= 0.0:
                    continue
                i = u_list[h]
                ready = True
                for p in range(dep_ptr[i], dep_ptr[i + 1]):
                    if not done[dep_idx[p]]:
                        ready = False
                        break
                if not ready:
                    continue
                start[i] = t
                head[u] = h + 1
                changed = True
                if unit_is_dma[u]:
                    if busy_since[u] < 0.0:
                        busy_since[u] = t
                else:
                    d = dur[i]
                    if last_end[u] == t:
                        d -= hide[i]  # back to back: fill overlaps the previous drain
                    busy_end[u] = t + d
                    busy[u] += d
        # 2. Transfers in their data phase: the oldest in flight on each queue, latency paid.
        for r in range(n_res):
            res_count[r] = 0
        for u in range(n_units):
            rate[u] = 0.0
            if unit_is_dma[u] and first[u] < head[u]:
                i = u_list[first[u]]
                if start[i] + dur[i] <= t:
                    if data_start[i] < 0.0:
                        data_start[i] = t
                    for r in range(n_res):
                        if res[i] & (1 << r):
                            res_count[r] += 1
        for u in range(n_units):
            if unit_is_dma[u] and first[u] < head[u]:
                i = u_list[first[u]]
                if data_start[i] >= 0.0:
                    rt = queue_rate[u]
                    for r in range(n_res):
                        if res[i] & (1 << r):
                            share = res_rate[r] / res_count[r]
                            if share < rt:
                                rt = share
                    rate[u] = rt
        # 3. The next event.
        tn = INF
        for u in range(n_units):
            if unit_is_dma[u]:
                if first[u] < head[u]:
                    i = u_list[first[u]]
                    if data_start[i] >= 0.0:
                        te = t + remaining[i] / rate[u] if remaining[i] > 0.0 else t
                    else:
                        te = start[i] + dur[i]
                    if te < tn:
                        tn = te
            elif busy_end[u] >= 0.0 and busy_end[u] < tn:
                tn = busy_end[u]
        if tn == INF:
            return start, data_start, end, busy, -1.0  # cannot happen: deps point backwards
        # 4. Advance to it and retire what finished.
        t0 = t
        dt = tn - t
        t = tn
        for u in range(n_units):
            if unit_is_dma[u]:
                if first[u] < head[u]:
                    i = u_list[first[u]]
                    if data_start[i] >= 0.0:
                        te = t0 + remaining[i] / rate[u] if remaining[i] > 0.0 else t0
                        if te <= t:
                            remaining[i] = 0.0
                            end[i] = t
                            done[i] = True
                            n_done += 1
                            first[u] += 1
                            if first[u] == head[u]:
                                busy[u] += t - busy_since[u]
                                busy_since[u] = -1.0
                        else:
                            remaining[i] -= rate[u] * dt
            elif busy_end[u] >= 0.0 and busy_end[u] <= t:
                i = u_list[head[u] - 1]
                end[i] = busy_end[u]
                last_end[u] = busy_end[u]
                done[i] = True
                n_done += 1
                busy_end[u] = -1.0
    total = 0.0
    for i in range(n):
        if end[i] > total:
            total = end[i]
    return start, data_start, end, busy, total


@dataclass
class Schedule:
    """Per-instruction times (cycles) and per-unit busy cycles of one scheduled stream."""

    start: np.ndarray
    data_start: np.ndarray  # DMA: when bytes began to move; -1 for compute
    end: np.ndarray
    busy: np.ndarray  # per unit: compute = sum of costs; DMA queue = time with work in flight
    total: float


def schedule(stream, cfg) -> Schedule:
    """Schedule an ``InstructionStream`` (see program.py) on the chip ``cfg``."""
    n_units = stream.n_units
    unit = stream.unit
    order = np.argsort(unit, kind="stable").astype(np.int64)
    counts = np.bincount(unit, minlength=n_units)
    u_ptr = np.zeros(n_units + 1, np.int64)
    np.cumsum(counts, out=u_ptr[1:])
    unit_is_dma = np.zeros(n_units, np.bool_)
    unit_is_dma[stream.first_dma_unit :] = True
    queue_rate = np.full(n_units, float(cfg.dma_queue_bytes_per_cycle))
    res_rate = np.array(
        # DRAM sustains dram_efficiency of its peak (refresh, bank and turnaround losses).
        [
            cfg.dram_bytes_per_cycle * cfg.dram_efficiency,
            cfg.shared_sram_bytes_per_cycle,
            cfg.host_bytes_per_cycle,
        ],
        dtype=np.float64,
    )
    start, data_start, end, busy, total = _schedule(
        unit,
        stream.is_dma,
        stream.dur,
        stream.hide,
        stream.nbytes,
        stream.res,
        stream.dep_ptr,
        stream.dep_idx,
        u_ptr,
        order,
        unit_is_dma,
        queue_rate,
        res_rate,
        int(cfg.dma_outstanding),
    )
    if total < 0:
        raise RuntimeError("scheduler found no next event: the instruction stream is inconsistent")
    return Schedule(start, data_start, end, busy, float(total))
