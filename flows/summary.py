"""What `vidopt run` prints at the end: the dataset, the compression ladder, the hardware targets, and where to look."""
from __future__ import annotations

from vidopt.config import PipelineConfig
from vidopt.report import terminal_summary
from vidopt.stages import open_store
from vidopt.tracking import default_tracking_uri


def _pct(value) -> str:
    return f"{100 * value:5.1f}" if isinstance(value, (int, float)) else "    -"


def dataset_lines(dataset: dict) -> list[str]:
    counts = dataset["class_counts"]
    width = max(len("class"), *(len(c) for c in counts))
    lines = [f"data version {dataset['data_version']}: {dataset['num_videos']} videos, "
             f"{dataset['num_quarantined']} quarantined, {dataset['downloaded']} downloaded",
             f"{'class':<{width}}  train    val   test  total"]
    lines += [f"{label:<{width}}  {c['train']:5d}  {c['val']:5d}  {c['test']:5d}  {c['total']:5d}"
              for label, c in counts.items()]
    return lines + [f"manifest:   {dataset['manifest_uri']}", f"quarantine: {dataset['quarantine_uri']}"]


def ladder_lines(ladder: dict) -> list[str]:
    """One row per rung; the int8 rung's latency is measured side by side with its fp32 input in the quantize stage."""
    lines = ["", "model          test top-1 clip/video    GMACs     params    size MB   notes"]
    for name, artifact in ladder.items():
        m = artifact["metrics"]
        size = m.get("size_int8_mb") if name == "int8" else m.get("size_bytes", 0) / 1e6
        notes = artifact.get("notes", {})
        note = notes.get("quantization", "") if name == "int8" else ""
        if name == "int8" and "speedup.b1.t1" in m:
            quiet = m.get("speedup_quietest.b1.t1")
            note += f"; {m['speedup.b1.t1']:.2f}x vs fp32 (batch 1, 1 thread: " \
                    f"{m['latency.fp32.b1.t1.p50_ms']:.2f} -> {m['latency.int8.b1.t1.p50_ms']:.2f} ms" \
                    + (f"; quietest rounds {quiet:.2f}x)" if quiet else ")")
        lines.append(f"{name:<14} {_pct(m.get('test_top1_clip'))} / {_pct(m.get('test_top1_video'))}        "
                     f"{m.get('macs', 0) / 1e9:7.3f}  {m.get('params', 0):9,.0f}  {size:9.3f}   {note}")
    return lines


def target_lines(targets: list[dict]) -> list[str]:
    lines = ["", "target  status    top-1   parity                         latency ms  runtime / reason"]
    for t in targets:
        parity = ", ".join(f"{k} {v:.3g}" for k, v in t["parity"].items())
        latency = f"{t['latency_ms']:10.2f}" if t.get("latency_ms") is not None else "         -"
        detail = t["runtime"] if t["status"] == "ok" else t["reason"]
        lines.append(f"{t['target']:<7} {t['status']:<8} {_pct(t.get('top1'))}   {parity:<30} {latency}  {detail}")
    return lines


def registry_lines(decisions: list[dict]) -> list[str]:
    lines = ["", "registry"]
    for d in decisions:
        version = f"version {d['version']}" if d["version"] is not None else "-"
        role = "champion" if d["champion"] else ("challenger" if d["version"] is not None else "")
        lines.append(f"  {d['model']:<14} {version:<11} {role:<10}  {d['reason']}")
        lines += [f"      {g['name']}: {'pass' if g['passed'] else 'FAIL'} ({g['detail']})" for g in d.get("gates", [])
                  if not g["passed"]]
    return lines


def run_markdown(cfg: PipelineConfig, result: dict) -> str:
    """The run as markdown: the ladder, the targets, the registry's decisions, links to MLflow and the report."""
    uri = cfg.tracking.uri or default_tracking_uri(cfg.run.project_dir)
    lines = ["# vidopt run", "", f"MLflow run `{result['mlflow_run_id']}` in `{uri}`; report: "
             f"`{result['report']['html_uri']}`", "", "| rung | test top-1 clip / video % | GMACs | notes |",
             "|---|---:|---:|---|"]
    for name, artifact in result["ladder"].items():
        m = artifact["metrics"]
        lines.append(f"| {name} | {_pct(m.get('test_top1_clip')).strip()} / {_pct(m.get('test_top1_video')).strip()} "
                     f"| {m.get('macs', 0) / 1e9:.3f} | {artifact.get('notes', {}).get('quantization', '')} |")
    lines += ["", "| target | status | top-1 % | latency ms | runtime / reason |", "|---|---|---:|---:|---|"]
    for t in result["targets"]:
        latency = f"{t['latency_ms']:.2f}" if t.get("latency_ms") is not None else "-"
        lines.append(f"| {t['target']} | {t['status']} | {_pct(t.get('top1')).strip()} | {latency} | "
                     f"{(t['runtime'] if t['status'] == 'ok' else t['reason']).replace('|', '/')} |")
    lines += ["", "| model | version | champion | reason |", "|---|---|---|---|"]
    lines += [f"| {d['model']} | {d['version'] or '-'} | {'yes' if d['champion'] else 'no'} | "
              f"{d['reason'].replace('|', '/')} |" for d in result["registry"]]
    return "\n".join(lines) + "\n"


def publish_run_artifact(cfg: PipelineConfig, result: dict) -> None:
    """[Prefect] a markdown artifact of the run, on the flow run's page."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(run_markdown(cfg, result), key="vidopt-run",
                             description="The compression ladder, the targets, the registry's decisions and links")


def print_summary(cfg: PipelineConfig, result: dict) -> None:
    lines = [""] + dataset_lines(result["dataset"])
    if result.get("ladder"):
        lines += ladder_lines(result["ladder"])
    if result.get("targets"):
        lines += target_lines(result["targets"])
    if result.get("registry"):
        lines += registry_lines(result["registry"])
    if result.get("report"):
        table, path = terminal_summary(result["report"], open_store(cfg.run))
        lines += ["", table.rstrip(), f"report: {path}"]
    uri = cfg.tracking.uri or default_tracking_uri(cfg.run.project_dir)
    lines += ["", f"MLflow run {result['mlflow_run_id']} in {uri}  (browse: mlflow ui --backend-store-uri {uri})"]
    print("\n".join(lines))
