"""`vidopt bench seeds`: the ladder per seed, with each rung's mean and spread."""
import pytest

from flows import bench_seeds


@pytest.mark.integration
def test_each_seed_trains_its_own_ladder_and_the_table_summarises_them(sample_dir, tmp_path, capsys):
    overrides = [f"run.project_dir={tmp_path / 'project'}", f"data.source={sample_dir}", "teacher.epochs=1",
                 "distill.epochs=1", "prune.finetune_epochs=1", "quantize.qat_epochs=1"]
    report = bench_seeds.main(["--profile", "tiny", "--seeds", "0", "1", *overrides])
    per_seed = report["per_seed"]
    assert set(per_seed) == {0, 1} and all(0 <= per_seed[s][r] <= 1 for s in (0, 1) for r in ("teacher", "int8"))
    teacher = report["summary"]["teacher"]
    assert teacher["mean"] == pytest.approx((per_seed[0]["teacher"] + per_seed[1]["teacher"]) / 2)
    out = capsys.readouterr().out
    gap = report["int8_below_teacher_points"]
    side = f"{abs(gap):.1f} points {'below' if gap > 0 else 'above'} the mean teacher"
    assert "| int8 |" in out and "seed 1" in out and side in out
