"""Timing for the benchmarks: device-synchronised milliseconds, interleaved runs, and the rows they give."""
import datetime
import time

import numpy as np
import torch


def elapsed_ms(run, device: torch.device) -> float:
    """Milliseconds of one call of `run` (CUDA events after a synchronisation on the GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def time_interleaved(runs: dict, warmup: int, iters: int, device: torch.device) -> dict[tuple, np.ndarray]:
    """Milliseconds of `iters` runs of each callable, one run of each in turn (the order rotating every round)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    keys, times = list(runs), {key: [] for key in runs}
    for round_index in range(iters):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            times[key].append(elapsed_ms(runs[key], device))
    return {key: np.array(values) for key, values in times.items()}


def timing_rows(times: dict[tuple, np.ndarray], common: dict, batch_size: int) -> list[dict]:
    """CSV rows from the milliseconds of each (mode, dtype, compiled, runtime) measurement."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for (mode, dtype, compiled, runtime), milliseconds in times.items():
        median = float(np.median(milliseconds))
        rows.append({**common, "dtype": dtype, "batch_size": batch_size, "mode": mode, "compile": compiled,
                     "runtime": runtime,
                     "latency_ms_median": round(median, 3),
                     "latency_ms_p90": round(float(np.percentile(milliseconds, 90)), 3),
                     "throughput_img_s": round(batch_size * 1e3 / median, 3), "date": date})
    return rows

