"""Batch-1 CPU latency of a network file in its runtime (onnxruntime here): what a user compares deployments by.

Measured on one thread (a phone core, a busy server's share) and on all of the machine's cores (onnxruntime's
default intra-op pool), each the median over repeated runs after a warm-up, on a random image of the trained
resolution (latency does not depend on the pixel values). Numbers are of this machine: `cpu` says which.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from data_pipes.shards.make import default_workers  # the CPUs this process may use

REPEATS = 50
WARMUP = 5


def cpu_name() -> str:
    """The CPU model, for reading latency figures (they are this machine's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def onnx_latency_ms(path: str | os.PathLike, img_size: int, *, threads: int, repeats: int = REPEATS) -> float:
    """Median ms of one batch-1 run of the ONNX file at `threads` intra-op threads (0: onnxruntime's default, all
    cores)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, 3, img_size, img_size), dtype=np.float32)
    for _ in range(WARMUP):
        session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def onnx_latencies(path: str | os.PathLike, img_size: int, *, prefix: str = "") -> dict[str, float]:
    """{`<prefix>onnx_1thread`, `<prefix>onnx_all_threads`}: batch-1 ms on one thread and on all cores."""
    return {f"{prefix}onnx_1thread": onnx_latency_ms(path, img_size, threads=1),
            f"{prefix}onnx_all_threads": onnx_latency_ms(path, img_size, threads=0)}


def latency_context() -> dict[str, object]:
    """Where the latency figures were measured."""
    return {"cpu": cpu_name(), "cores": default_workers(), "batch": 1, "repeats": REPEATS, "statistic": "median"}
