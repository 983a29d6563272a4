"""Chrome-trace / Perfetto JSON export: one track per compute unit and per DMA queue.

Open the file at https://ui.perfetto.dev (or chrome://tracing). Time is emulated
microseconds at the chip's clock. A DMA slice spans the cycles its bytes move; its issue time
and latency are in the slice's arguments.
"""

from __future__ import annotations

import json
import os
import tempfile


def trace_events(report) -> list[dict]:
    stream, sched = report.stream, report.schedule
    us = 1e6 / report.clock_hz
    n_engines = stream.first_dma_unit // 3
    dma_pid = n_engines
    events = []
    for pid in range(n_engines):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"engine {pid}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}})
    events.append({"ph": "M", "name": "process_name", "pid": dma_pid, "args": {"name": "DMA queues"}})
    events.append({"ph": "M", "name": "process_sort_index", "pid": dma_pid, "args": {"sort_index": dma_pid}})
    for u, uname in enumerate(stream.unit_names):
        pid, tid = (dma_pid, u - stream.first_dma_unit) if u >= stream.first_dma_unit else divmod(u, 3)
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": uname}})
    for i in range(len(stream)):
        u = int(stream.unit[i])
        pid, tid = (dma_pid, u - stream.first_dma_unit) if stream.is_dma[i] else divmod(u, 3)
        events.append(_slice(stream, sched, i, pid, tid, us, bool(stream.is_dma[i])))
    return events


def _slice(stream, sched, i: int, pid: int, tid: int, us: float, dma: bool) -> dict:
    """Instruction ``i``'s slice on track (pid, tid): a DMA spans the cycles its bytes move."""
    end = float(sched.end[i])
    if dma:
        begin = float(sched.data_start[i])
        args = {
            "bytes": int(stream.nbytes[i]),
            "issued_cycle": float(sched.start[i]),
            "latency_cycles": float(stream.dur[i]),
            "cycles": end - begin,
        }
    else:
        begin = float(sched.start[i])
        args = {"cycles": end - begin}
    return {
        "name": stream.labels[i],
        "cat": stream.ops[i],
        "ph": "X",
        "pid": pid,
        "tid": tid,
        "ts": begin * us,
        "dur": (end - begin) * us,
        "args": args,
    }


def write_trace(path, report) -> str:
    """Write atomically (a temporary file renamed into place); return the path."""
    doc = {
        "traceEvents": trace_events(report),
        "displayTimeUnit": "ns",
        "otherData": {"kernel": report.name, "npu": report.npu, "cycles": report.cycles},
    }
    return _write_json(path, doc)


def _write_json(path, doc) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".trace-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_sequence_trace(path, reports, name: str = "sequence") -> str:
    """One timeline for kernels run one after another: each report's instructions shifted by
    the cycles of the kernels before it, plus a "kernels" track with one slice per kernel.
    Reports without a schedule (plans loaded from disk) appear on the kernels track only."""
    if not reports:
        raise ValueError("write_sequence_trace needs at least one report")
    clock = reports[0].clock_hz
    us = 1e6 / clock
    events, offset, seen = [], 0.0, set()
    kernels_pid = 10_000
    events.append({"ph": "M", "name": "process_name", "pid": kernels_pid, "args": {"name": "kernels"}})
    events.append({"ph": "M", "name": "process_sort_index", "pid": kernels_pid, "args": {"sort_index": -1}})
    for r in reports:
        events.append(
            {
                "name": r.name,
                "cat": "kernel",
                "ph": "X",
                "pid": kernels_pid,
                "tid": 0,
                "ts": offset * us,
                "dur": r.cycles * us,
                "args": {"cycles": r.cycles, "pct_of_roofline": r.pct_of_roofline},
            }
        )
        if r.schedule is not None:
            for e in trace_events(r):
                if e["ph"] == "M":
                    key = (e["name"], e["pid"], e.get("tid"))
                    if key in seen:
                        continue
                    seen.add(key)
                else:
                    e = dict(e, ts=e["ts"] + offset * us)
                events.append(e)
        offset += r.cycles
    doc = {"traceEvents": events, "displayTimeUnit": "ns", "otherData": {"name": name, "cycles": int(offset)}}
    return _write_json(path, doc)


def group_trace_events(report) -> list[dict]:
    """A group run's timeline: per device a process for each engine and one for its DMA
    queues, and a "links" process with a track per link queue."""
    stream, sched = report.stream, report.schedule
    us = 1e6 / report.clock_hz
    upd, n = report.units_per_device, report.num_devices
    n_engines = len([u for u in report.devices[0].unit_busy if u.endswith(".matrix")])
    first_dma = 3 * n_engines
    per_device = n_engines + 1  # pids: engines, then the DMA queues
    links_pid = n * per_device
    events = []

    def process(pid, name):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}})

    for d in range(n):
        for e in range(n_engines):
            process(d * per_device + e, f"device {d} engine {e}")
        process(d * per_device + n_engines, f"device {d} DMA queues")
    process(links_pid, "links")

    def place(u):
        if u >= n * upd:
            return links_pid, u - n * upd
        d, local = divmod(u, upd)
        if local >= first_dma:
            return d * per_device + n_engines, local - first_dma
        e, kind = divmod(local, 3)
        return d * per_device + e, kind

    for u, uname in enumerate(stream.unit_names):
        pid, tid = place(u)
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": uname}})
    for i in range(len(stream)):
        u = int(stream.unit[i])
        events.append(_slice(stream, sched, i, *place(u), us, bool(stream.unit_is_dma[u])))
    return events


def write_group_sequence_trace(path, steps, name: str = "sequence") -> str:
    """One timeline of a device group running a program part by part: ``steps`` in order, each
    ``("part", label, reports)`` (``reports[d]``: device d's kernels, one after another, all
    devices starting together) or ``("collective", group_report)``. A part lasts as long as its
    busiest device; a collective its critical path. Each device gets a "device d kernels" track
    (one slice per kernel) beside its engines and DMA queues, and the collectives' transfers go
    on the "links" tracks. Reports without a schedule appear on the kernels tracks only."""
    if not steps:
        raise ValueError("write_group_sequence_trace needs at least one step")
    first = steps[0][1] if steps[0][0] == "collective" else steps[0][2][0][0]
    us = 1e6 / first.clock_hz
    n = len(steps[0][2]) if steps[0][0] == "part" else steps[0][1].num_devices
    engines = None
    events, seen, offset = [], set(), 0.0

    def add(e, shift):
        if e["ph"] == "M":
            key = (e["name"], e["pid"], e.get("tid"))
            if key in seen:
                return
            seen.add(key)
            events.append(e)
        else:
            events.append(dict(e, ts=e["ts"] + shift * us))

    def kernel_slice(d, label, start, cycles, cat):
        pid = 100_000 + d
        add({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"device {d} kernels"}}, 0)
        add({"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": -n + d}}, 0)
        events.append(
            {"name": label, "cat": cat, "ph": "X", "pid": pid, "tid": 0, "ts": start * us, "dur": cycles * us}
        )

    for step in steps:
        if step[0] == "collective":
            report = step[1]
            for d in range(n):
                kernel_slice(d, report.name, offset, report.cycles, "collective")
            if report.schedule is not None:
                for e in group_trace_events(report):
                    add(e, offset)
            offset += report.cycles
            continue
        _, label, per_device = step
        span = 0
        for d, reports in enumerate(per_device):
            t = offset
            for r in reports:
                kernel_slice(d, r.name, t, r.cycles, label)
                if r.schedule is not None:
                    engines = engines or r.stream.first_dma_unit // 3
                    per = engines + 1  # a device's pids, as group_trace_events numbers them
                    for e in trace_events(r):
                        e = dict(e, pid=d * per + e["pid"])
                        if e["ph"] == "M" and e["name"] == "process_name":
                            e["args"] = {"name": f"device {d} {e['args']['name']}"}
                        elif e["ph"] == "M" and e["name"] == "process_sort_index":
                            e["args"] = {"sort_index": e["pid"]}
                        add(e, t)
                t += r.cycles
            span = max(span, t - offset)
        offset += span
    doc = {
        "traceEvents": events,
        "displayTimeUnit": "ns",
        "otherData": {"name": name, "devices": n, "cycles": int(offset)},
    }
    return _write_json(path, doc)


def write_group_trace(path, report) -> str:
    """Write a group run's timeline atomically; return the path."""
    doc = {
        "traceEvents": group_trace_events(report),
        "displayTimeUnit": "ns",
        "otherData": {
            "kernel": report.name,
            "npu": report.npu,
            "link": report.link,
            "devices": report.num_devices,
            "cycles": report.cycles,
        },
    }
    return _write_json(path, doc)
