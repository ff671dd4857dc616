"""What a figure was measured on, and how much memory a run took (torch-free: llama.cpp's child process uses it)."""
from __future__ import annotations

import platform
import sys
from pathlib import Path


def machine() -> dict:
    """What a figure was measured on: CPU model and capability, threads, torch (reported with every figure)."""
    import torch
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return {"platform": platform.platform(), "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": " avx512_bf16" in flags, "amx": " amx_tile" in flags, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM on Linux (ru_maxrss survives exec, so a child of a big
    process would report its parent's size), else ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
