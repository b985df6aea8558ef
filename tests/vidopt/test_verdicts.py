"""What a run's numbers say once their noise is counted: intervals per rung, paired tests on the same videos, and
the headlines (a student that beats its teacher, a teacher that did not teach)."""
import numpy as np

from vidopt.artifacts import ModelArtifact
from vidopt.stats import pack_correct
from vidopt.verdicts import confusion_png, ladder_verdicts


def rung(kind: str, right: int, n: int = 100, **notes) -> ModelArtifact:
    return ModelArtifact(uri="/m", kind=kind, arch={}, weights_sha256="0" * 64, data_version="v",
                         metrics={"test_top1_clip": right / n}, notes=notes,
                         test_correct=pack_correct(np.arange(n) < right), test_confusion=[[right, 0], [n - right, 0]])


def test_a_student_far_above_its_teacher_is_a_headline_and_one_clip_is_not():
    v = ladder_verdicts({"teacher": rung("teacher", 56), "student": rung("student", 76),
                         "pruned": rung("pruned", 77), "int8": rung("int8", 77)})
    assert [r.rung for r in v.rungs] == ["teacher", "student", "pruned", "int8"]
    assert v.rungs[0].interval[0] < 0.56 < v.rungs[0].interval[1] and v.rungs[0].videos == 100
    assert any(h.startswith("The student beats its teacher") for h in v.headlines)
    assert "not significant" in v.rungs[2].vs_previous          # 77 vs 76: one clip
    assert v.confusion == [[77, 0], [23, 0]] and v.recall == [1.0, 0.0]
    assert confusion_png(v.confusion, ["a", "b"], "t")[:4] == b"\x89PNG"


def test_a_teacher_that_did_not_teach_leads_the_headlines():
    check = "teacher val top-1 12.0% (...) vs always answering 'a' (15.0%): p=0.7 (not significantly better)"
    v = ladder_verdicts({"teacher": rung("teacher", 12), "student": rung("student", 14, teacher_check=check)})
    assert v.headlines[0].startswith("The teacher did not teach") and len(v.headlines) == 1
