"""Cross-validation (data.folds=k): the teacher and the student trained once per fold through their own stages, every
video tested exactly once, pooled top-1 with its interval, the folds' spread, in the report; off by default.

    .venv/bin/pytest tests/tasks/test_crossval.py
"""
import pytest

from tasks import crossval, ingest
from vidopt.config import ReportConfig
from vidopt.report import build_report, render_table, rows_json
from vidopt.stages import read_manifest, open_store
from vidopt.stats import unpack_correct
from vidopt.storage import read_jsonl

FAST = ["teacher.epochs=1", "distill.epochs=1", "distill.cached_clips_per_video=1", "distill.check_teacher=false"]


def test_three_folds_test_every_video_once_and_pool_their_scores(sample_dir, tiny_cfg, tiny_ladder):
    cfg = tiny_cfg(f"data.source={sample_dir}", "data.folds=3", *FAST)
    dataset = ingest.run(cfg)
    assert crossval.run(cfg.model_copy(update={"data": cfg.data.model_copy(update={"folds": 0})}), dataset) is None

    cv = crossval.run(cfg, dataset)
    assert [f.fold for f in cv.folds] == [0, 1, 2]
    assert sum(f.test_videos for f in cv.folds) == dataset.num_videos == cv.pooled["teacher"]["videos"]
    store = open_store(cfg.run)
    tested = []
    for f in cv.folds:
        rows = read_jsonl(store.local_path(f"{cv.uri}/fold-{f.fold}-of-3/manifest.jsonl"))
        test = [r["sha256"] for r in rows if r["split"] == "test"]
        assert len(test) == f.test_videos and {r["split"] for r in rows} == {"train", "val", "test"}
        # stratified: every class has its share of each fold's test videos (8 per class: 3, 3, 2)
        per_class = {label: sum(r["split"] == "test" and r["label"] == label for r in rows) for label in dataset.classes}
        assert set(per_class.values()) <= {2, 3}
        tested += test
    assert sorted(tested) == sorted(r["sha256"] for r in read_manifest(store, dataset))   # each video once

    for rung in crossval.RUNGS:
        pooled = cv.pooled[rung]
        right = sum(int(unpack_correct(f.correct[rung]).sum()) for f in cv.folds)
        assert pooled["top1"] == pytest.approx(right / dataset.num_videos)
        assert pooled["low"] <= pooled["top1"] <= pooled["high"]
        assert pooled["fold_mean"] == pytest.approx(sum(f.top1[rung] for f in cv.folds) / 3)
    assert "McNemar" in cv.student_vs_teacher

    assert crossval.run(cfg, dataset) == cv   # finished: read back from the store, nothing trained again

    _, ladder = tiny_ladder
    report = build_report({k: ladder[k] for k in ("teacher", "student", "pruned", "int8")}, [], cfg.budgets,
                          ReportConfig().profiles, crossval=cv)
    assert "Cross-validation: 3 folds, every video tested once" in render_table(report)
    assert rows_json(report)["crossval"]["pooled"]["student"]["videos"] == dataset.num_videos


def test_more_folds_than_a_class_has_videos_is_an_error_naming_the_setting(sample_dir, tiny_cfg):
    cfg = tiny_cfg(f"data.source={sample_dir}", "data.folds=9", *FAST)
    with pytest.raises(ValueError, match=r"data.folds=9 but a class has only 8 videos"):
        crossval.run(cfg, ingest.run(cfg))
