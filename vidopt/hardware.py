"""This CPU's peak multiply-accumulate rate per core and precision, from /proc/cpuinfo's flags and clock: the ceiling
that the ladder's achieved GMAC/s are a share of (vidopt/bench/ladder.py).

    python -m vidopt.hardware   # model, clock and its source, peak GMAC/s per core per precision, as JSON
"""
from __future__ import annotations

import json
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
MAX_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")  # kHz; absent on most VMs

# The fastest unit per precision that a flag reveals, best first: (precision, flag, unit, MACs per cycle per core).
# A MAC is one multiply-add (2 ops). Intel's "Accelerate AI Workloads with Intel AMX" (p. 4, quoted in PyTorch's AMX
# recipe, https://pytorch.org/tutorials/recipes/amx.html): a 4th Gen Xeon core does 2,048 INT8 ops/cycle with AMX
# against 256 with AVX-512 VNNI, and 1,024 BF16 ops/cycle with AMX against 64 FP32 ops/cycle with AVX-512.
# The vector rows assume two 512-bit FMA ports (2 x 16 fp32 lanes; VPDPBUSD 2 x 64 u8*s8; VDPBF16PS 2 x 32 bf16):
# flags cannot tell a one-port SKU or a double-pumped AVX-512 (Zen 4) apart, where the true peak is half.
UNITS = [
    ("fp32", "avx512f", "AVX-512 FMA", 32),
    ("fp32", "fma", "AVX2 FMA", 16),
    ("bf16", "amx_bf16", "AMX-BF16", 512),
    ("bf16", "avx512_bf16", "AVX-512 BF16", 64),
    ("int8", "amx_int8", "AMX-INT8", 1024),
    ("int8", "avx512_vnni", "AVX-512 VNNI", 128),
    ("int8", "avx_vnni", "AVX-VNNI", 64),   # 256-bit VPDPBUSD
]
PRECISIONS = ("fp32", "bf16", "int8")


def cpu_flags(cpuinfo: str) -> set[str]:
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def clock_ghz(cpuinfo: str, max_freq: Path = MAX_FREQ) -> tuple[float, str]:
    """The clock the peaks assume and where it came from: cpufreq's cpuinfo_max_freq where the kernel exposes it,
    else the highest "cpu MHz" in /proc/cpuinfo (a VM's nominal clock: turbo above it and AVX-512/AMX licence
    clocks below it are invisible here)."""
    try:
        return int(max_freq.read_text().strip()) / 1e6, str(max_freq)
    except (OSError, ValueError):
        pass
    mhz = [float(ln.partition(":")[2]) for ln in cpuinfo.splitlines() if ln.startswith("cpu MHz")]
    if not mhz:
        raise RuntimeError("hardware: no 'cpu MHz' in /proc/cpuinfo and no cpufreq; cannot derive peak MAC rates")
    return max(mhz) / 1e3, "the highest cpu MHz in /proc/cpuinfo"


def peaks(flags: set[str], ghz: float) -> dict[str, dict | None]:
    """{precision: {unit, macs_per_cycle, gmac_s_per_core}} of the best unit the flags show, None where none does."""
    out: dict[str, dict | None] = dict.fromkeys(PRECISIONS)
    for precision, flag, unit, macs in UNITS:
        if out[precision] is None and flag in flags:
            out[precision] = {"unit": unit, "macs_per_cycle": macs, "gmac_s_per_core": macs * ghz}
    return out


def describe(cpuinfo_path: Path = CPUINFO, max_freq: Path = MAX_FREQ) -> dict:
    """This machine: model name, cores, the flags that set a peak, the clock and its source, and the peaks."""
    try:
        text = cpuinfo_path.read_text()
    except OSError:
        text = ""
    names = [ln.partition(":")[2].strip() for ln in text.splitlines() if ln.startswith("model name")]
    values = [ln.partition(":")[2].strip() for ln in text.splitlines() if ln.startswith(("physical id", "core id"))]
    cores = len(set(zip(values[::2], values[1::2]))) or len(names)  # SMT siblings share one core's units
    flags = cpu_flags(text)
    try:
        ghz, source = clock_ghz(text, max_freq)
    except RuntimeError:
        ghz, source = 0.0, "unknown"
    return {"model": names[0] if names else "unknown CPU", "cores": cores or None, "ghz": ghz,
            "clock_source": source, "flags": sorted({flag for _, flag, _, _ in UNITS} & flags),
            "peaks": peaks(flags, ghz) if ghz else dict.fromkeys(PRECISIONS)}


def peak_share(gmacs: float, p50_ms: float, precision: str, threads: int, machine: dict) -> dict:
    """One call's achieved rate, gmacs / p50 (batch 1), and its share of `threads` cores' peak at `precision`
    (None where this CPU shows no unit for it)."""
    rate = gmacs / (p50_ms / 1e3)
    peak = machine["peaks"].get(precision)
    cores = min(threads, machine["cores"] or threads)
    return {"precision": precision, "unit": peak and peak["unit"], "gmac_s": rate,
            "peak_share": rate / (peak["gmac_s_per_core"] * cores) if peak else None}


if __name__ == "__main__":
    print(json.dumps(describe(), indent=2))
