"""A tiny trained student, its eval clips and its int8 QDQ ONNX, built once per session for the back-end tests."""
import pytest

from workers.gpu import make_demo_job


@pytest.fixture(scope="session")
def demo_job(tmp_path_factory):
    return make_demo_job(tmp_path_factory.mktemp("demo"), with_int8=True)
