"""A tiny trained student, its eval clips and its int8 QDQ ONNX, built once per session for the back-end tests."""
import pytest

from vidopt.artifacts import default_options
from workers.gpu import make_demo_job


def for_target(job, target: str, options: dict | None = None, **fields):
    """The demo job sent to another target, with that target's typed options (defaults updated by `options`)."""
    typed = default_options(target).model_copy(update=options or {})
    return job.model_copy(update={"target": target, "options": typed, **fields})


@pytest.fixture(scope="session")
def demo_job(tmp_path_factory):
    return make_demo_job(tmp_path_factory.mktemp("demo"), with_int8=True)
