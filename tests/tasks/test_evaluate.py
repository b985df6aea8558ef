"""`vidopt evaluate` on a labeled folder: the int8 model through onnxruntime and a stage's PyTorch model give a
top-1 with its interval, per-class recall and a confusion matrix that add up."""
import json
from pathlib import Path

import pytest

from flows.cli import main
from tasks import evaluate


def test_evaluate_int8_and_pytorch_models_on_a_labeled_folder(tiny_ladder, sample_dir, tmp_path, capsys):
    cfg, stages = tiny_ladder
    int8 = evaluate.run(cfg, str(sample_dir), Path(stages["int8"].uri), tmp_path / "int8")
    assert int8["runtime"].startswith("onnxruntime ") and int8["runtime"].endswith(" int8") and int8["clips"] == int8["videos"] == 64
    matrix = int8["confusion"]
    assert sum(map(sum, matrix)) == 64 and sum(matrix[i][i] for i in range(len(matrix))) == round(64 * int8["top1"])
    low, high = int8["top1_ci"]
    assert low <= int8["top1"] <= high and (tmp_path / "int8" / "confusion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "int8" / "evaluation.json").read_text())["classes"] == stages["dataset"].classes

    student = evaluate.run(cfg, str(sample_dir), Path(stages["student"].uri), tmp_path / "student")
    assert student["runtime"] == "PyTorch fp32" and student["clips"] == 64

    code = main(["evaluate", "--profile", "tiny", f"run.project_dir={cfg.run.project_dir}", "--data",
                 str(sample_dir), "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert code == 0 and "95% CI" in out and "recall per class" in out


def test_a_folder_that_is_no_model_is_named(tiny_cfg, tmp_path):
    with pytest.raises(evaluate.EvaluateError, match="is not a model folder"):
        evaluate.run(tiny_cfg(), str(tmp_path), tmp_path)
