"""What every back-end shares: a worker module run in a fresh process, with a deadline; scores that count videos."""
import numpy as np

from vidopt.stats import unpack_correct
from workers.common import Truth, correct, run_module, top1


def test_child_process_sees_the_env_and_is_killed_at_its_deadline():
    ok = run_module("timeit", ["-n1", "import os; assert os.environ['VIDOPT_CHILD'] == 'yes'"], 60,
                    env={"VIDOPT_CHILD": "yes"})
    assert ok.returncode == 0, ok.stderr
    hung = run_module("timeit", ["-n1", "import time; time.sleep(30)"], 0.5, timeout_note="(option timeout_s)")
    assert hung.returncode == -9 and hung.stderr == "no answer after 0.5 s (option timeout_s)"


def test_correct_averages_each_videos_windows_and_top1_counts_clips():
    # video 7: windows say 0, 0, 1 (weakly, strongly for 1 overall); video 3: both windows say 1 (its label)
    logits = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 5.0], [0.0, 1.0], [0.0, 2.0]])
    truth = Truth(labels=np.array([0, 0, 0, 1, 1]), videos=np.array([7, 7, 7, 3, 3]))
    assert unpack_correct(correct(logits, truth)).tolist() == [False, True]   # videos in order of appearance
    assert top1(logits, truth) == 4 / 5
    assert unpack_correct(correct(logits, truth.head(2))).tolist() == [True]   # a cut-off eval set: its own videos
