"""Benchmarks: scripts that print numbers (`vidopt bench ...`), each also writing them as JSON and a markdown table."""
from __future__ import annotations

import json
import platform
from pathlib import Path

from vidopt.storage import atomic_write_text


def write_report(out: Path, stem: str, report: dict, table: str) -> None:
    """<out>/<stem>.json (the numbers) and <out>/<stem>.md (`table`), each written whole, then the table on stdout."""
    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=2))
    atomic_write_text(out / f"{stem}.md", table)
    print(table, end="")


def print_report(report: dict, table: str, json_path: Path | None) -> dict:
    """The table on stdout, and the numbers as JSON where asked (--json); returns the report."""
    print(table)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (int8 and bf16 gains differ from one CPU to the next)."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or "unknown CPU")
