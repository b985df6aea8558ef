"""What every back-end shares: a worker module run in a fresh process, with a deadline."""
from workers.common import run_module


def test_child_process_sees_the_env_and_is_killed_at_its_deadline():
    ok = run_module("timeit", ["-n1", "import os; assert os.environ['VIDOPT_CHILD'] == 'yes'"], 60,
                    env={"VIDOPT_CHILD": "yes"})
    assert ok.returncode == 0, ok.stderr
    hung = run_module("timeit", ["-n1", "import time; time.sleep(30)"], 0.5, timeout_note="(option timeout_s)")
    assert hung.returncode == -9 and hung.stderr == "no answer after 0.5 s (option timeout_s)"
