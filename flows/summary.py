"""What `vidopt run` prints at the end: the dataset per class and split, and where to look in MLflow."""
from __future__ import annotations

from vidopt.config import PipelineConfig
from vidopt.tracking import default_tracking_uri


def print_summary(cfg: PipelineConfig, result: dict) -> None:
    dataset = result["dataset"]
    counts = dataset["class_counts"]
    width = max(len("class"), *(len(c) for c in counts))
    print(f"\ndata version {dataset['data_version']}: {dataset['num_videos']} videos, "
          f"{dataset['num_quarantined']} quarantined, {dataset['downloaded']} downloaded")
    print(f"{'class':<{width}}  train    val   test  total")
    for label, c in counts.items():
        print(f"{label:<{width}}  {c['train']:5d}  {c['val']:5d}  {c['test']:5d}  {c['total']:5d}")
    print(f"manifest:   {dataset['manifest_uri']}")
    print(f"quarantine: {dataset['quarantine_uri']}")
    uri = cfg.tracking.uri or default_tracking_uri(cfg.run.project_dir)
    print(f"MLflow run {result['mlflow_run_id']} in {uri}  (browse: mlflow ui --backend-store-uri {uri})")
