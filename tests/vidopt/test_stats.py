"""The statistics against scipy's reference implementations (scipy is here as a dependency of other packages; vidopt
computes them itself) and against cases worked by hand."""
import numpy as np
import pytest
from scipy import stats as reference

from vidopt import stats


@pytest.mark.parametrize("correct,n", [(55, 71), (0, 13), (13, 13), (1, 8), (186, 197)])
def test_wilson_interval_matches_scipy(correct, n):
    expected = reference.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert stats.wilson_interval(correct, n) == pytest.approx((expected.low, expected.high), abs=1e-9)


@pytest.mark.parametrize("correct,n,rate", [(41, 71, 0.577), (55, 71, 0.577), (1, 13, 0.125), (13, 13, 0.5)])
def test_above_the_majority_rate_is_scipys_one_sided_binomial_test(correct, n, rate):
    expected = reference.binomtest(correct, n, rate, alternative="greater").pvalue
    assert stats.above_rate(correct, n, rate) == pytest.approx(expected, rel=1e-9)


def test_the_issues_real_footage_numbers():
    """Teacher 56.3% of 71 test videos vs a majority class of 57.7%: not above it; the student's 76.1%: far above."""
    assert stats.above_rate(40, 71, 0.577) > 0.5
    assert stats.above_rate(54, 71, 0.577) < 0.001
    assert stats.format_top1(55, 71) == "77.5% (66.5-85.6, 95% CI, n=71)"


def test_mcnemar_is_the_exact_binomial_on_the_discordant_clips():
    rng = np.random.default_rng(0)
    a = rng.random(197) < 0.9
    b = a.copy()
    b[:12] = ~b[:12]
    paired = stats.mcnemar(a, b)
    assert (paired.only_a, paired.only_b) == (int((a & ~b).sum()), int((~a & b).sum()))
    expected = reference.binomtest(paired.only_a, paired.only_a + paired.only_b, 0.5).pvalue
    assert paired.p_value == pytest.approx(expected, rel=1e-9)
    # one clip each way is no difference; 10 clips one way and none the other is
    one_each = stats.mcnemar(np.array([1, 0, 1, 1], bool), np.array([0, 1, 1, 1], bool))
    assert one_each.p_value == 1.0 and not one_each.a_worse()
    worse = stats.mcnemar(np.zeros(10, bool), np.ones(10, bool))
    assert worse.a_worse() and worse.p_value == pytest.approx(2 / 2**10)
    with pytest.raises(ValueError, match="same videos"):
        stats.mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_confusion_matrix_recall_and_packed_correctness():
    labels, predicted = np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 0, 2])
    matrix = stats.confusion(labels, predicted, 4)
    assert matrix.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert stats.per_class_recall(matrix) == [0.5, pytest.approx(2 / 3), 1.0, None]
    assert stats.majority_rate({"a": 3, "b": 5, "c": 2}) == ("b", 0.5)
    correct = np.random.default_rng(1).random(197) < 0.5
    packed = stats.pack_correct(correct)
    assert len(packed) < 60 and np.array_equal(stats.unpack_correct(packed), correct)
