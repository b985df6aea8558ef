"""External services fail fast and clearly: a missing bucket, refused or missing credentials, an unreachable MLflow
or Prefect each give `vidopt run` one line naming the endpoint and what to check, within 15 s, with no traceback."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from tests.conftest import free_port

LIMIT_S = 15.0
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL")


def vidopt_run(tmp_path: Path, *overrides: str, env: dict[str, str | None] | None = None, timeout: float = 120):
    """`vidopt run --profile tiny` in its own process -> (exit code, stderr + stdout, seconds)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "VIDOPT_DEBUG")}
    full_env.update(env or {})
    full_env = {k: v for k, v in full_env.items() if v is not None}   # None: unset
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny",
                           f"run.project_dir={tmp_path / 'project'}", *overrides],
                          env=full_env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    return proc.returncode, proc.stderr + proc.stdout, time.monotonic() - started


def assert_one_clear_line(rc: int, output: str, seconds: float, *names: str) -> None:
    assert rc not in (0, None) and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("vidopt: error: ")]
    assert len(errors) == 1, output
    for name in names:
        assert name in errors[0], (name, errors[0])
    assert seconds < LIMIT_S, f"{seconds:.1f} s: {errors[0]}"


@pytest.fixture(scope="module")
def s3_with_auth(tmp_path_factory):
    """A moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT: the IAM setup below is let through, then
    every request is authenticated), a user allowed everything, and a bucket `clips` -> (endpoint, key id, secret)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:   # a TCP connect: an S3 call would spend one of the unauthenticated actions
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
                           aws_secret_access_key="y")
        iam.create_user(UserName="vidopt")
        key = iam.create_access_key(UserName="vidopt")["AccessKey"]
        policy = iam.create_policy(PolicyName="all", PolicyDocument='{"Version": "2012-10-17", "Statement": '
                                   '[{"Effect": "Allow", "Action": "*", "Resource": "*"}]}')
        iam.attach_user_policy(UserName="vidopt", PolicyArn=policy["Policy"]["Arn"])
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                     aws_secret_access_key=key["SecretAccessKey"]).create_bucket(Bucket="clips")
        yield url, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def aws_env(endpoint: str, key_id: str | None, secret: str | None, tmp_path: Path) -> dict[str, str]:
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    if key_id:
        env |= {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
    return env


def without_aws(env: dict[str, str]) -> dict[str, str | None]:
    """`env` and none of the AWS variables of this process (the moto fixture's, a developer's own)."""
    return {k: None for k in AWS_VARS} | env


def test_a_bucket_that_does_not_exist(s3_with_auth, tmp_path):
    url, key_id, secret = s3_with_auth
    rc, out, seconds = vidopt_run(tmp_path, "data.source=s3://no-such-bucket/clips",
                                  env=without_aws(aws_env(url, key_id, secret, tmp_path)))
    assert_one_clear_line(rc, out, seconds, "s3://no-such-bucket/clips", "NoSuchBucket", url)


def test_an_unknown_access_key_id(s3_with_auth, tmp_path):
    url, _, _ = s3_with_auth
    rc, out, seconds = vidopt_run(tmp_path, "data.source=s3://clips/x",
                                  env=without_aws(aws_env(url, "AKIAUNKNOWN000000000", "whatever", tmp_path)))
    assert_one_clear_line(rc, out, seconds, "InvalidAccessKeyId", "AWS_ACCESS_KEY_ID")


def test_a_wrong_secret(s3_with_auth, tmp_path):
    url, key_id, _ = s3_with_auth
    marker = "vidopt-marker-secret-wrong"
    rc, out, seconds = vidopt_run(tmp_path, "data.source=s3://clips/x",
                                  env=without_aws(aws_env(url, key_id, marker, tmp_path)))
    assert_one_clear_line(rc, out, seconds, "SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY")
    assert marker not in out


def test_no_credentials_at_all(s3_with_auth, tmp_path):
    url, _, _ = s3_with_auth
    rc, out, seconds = vidopt_run(tmp_path, "data.source=s3://clips/x",
                                  env=without_aws(aws_env(url, None, None, tmp_path)))
    assert_one_clear_line(rc, out, seconds, "no usable AWS credentials", "AWS_ACCESS_KEY_ID")


def test_an_artifact_store_bucket_that_does_not_exist(s3_with_auth, tmp_path, sample_dir):
    url, key_id, secret = s3_with_auth
    rc, out, seconds = vidopt_run(tmp_path, f"data.source={sample_dir}", "run.artifact_root=s3://no-store/vidopt",
                                  env=without_aws(aws_env(url, key_id, secret, tmp_path)))
    assert_one_clear_line(rc, out, seconds, "run.artifact_root s3://no-store/vidopt", "no such bucket")


def test_an_unreachable_mlflow_server(tmp_path, sample_dir):
    rc, out, seconds = vidopt_run(tmp_path, f"data.source={sample_dir}", "tracking.uri=http://127.0.0.1:9")
    assert_one_clear_line(rc, out, seconds, "tracking.uri http://127.0.0.1:9", "MLflow", "mlflow server")


def test_an_unreachable_prefect_server(tmp_path, sample_dir):
    rc, out, seconds = vidopt_run(tmp_path, f"data.source={sample_dir}",
                                  env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert_one_clear_line(rc, out, seconds, "PREFECT_API_URL http://127.0.0.1:9/api", "Prefect")


@pytest.mark.integration
def test_a_data_error_inside_the_flow_is_one_line_and_leaves_no_run_running(tmp_path, sample_dir):
    """Found by ingest under Prefect (the folder exists, so the preflight passes): Prefect's own logs keep the
    message and drop the traceback, the CLI's last line names the problem, and the MLflow runs end FAILED."""
    from mlflow.tracking import MlflowClient

    source = tmp_path / "one-class"
    shutil.copytree(sample_dir / "move_left", source / "move_left")
    rc, out, _ = vidopt_run(tmp_path, f"data.source={source}", timeout=300)
    assert rc == 1 and "Traceback" not in out, out
    [error] = [line for line in out.splitlines() if line.startswith("vidopt: error: ")]
    assert error.startswith("vidopt: error: ingest: ") and "holds 1 class" in error
    client = MlflowClient(f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vidopt").experiment_id])
    assert runs and {r.info.status for r in runs} == {"FAILED"}, [(r.info.run_name, r.info.status) for r in runs]


@pytest.mark.parametrize("code, status, transient", [
    ("NoSuchBucket", 404, False), ("InvalidAccessKeyId", 403, False), ("SignatureDoesNotMatch", 403, False),
    ("AccessDenied", 403, False), ("SlowDown", 503, True), ("InternalError", 500, True),
    ("RequestTimeout", 400, True),
])
def test_s3_refusals_are_not_retried_and_passing_failures_are(code, status, transient):
    from botocore.exceptions import ClientError

    from tasks.retry import only_io_errors
    from vidopt.storage import StorageError, TransientStorageError, s3_errors

    with pytest.raises(StorageError) as caught, s3_errors("s3://b/k", "http://127.0.0.1:1"):
        raise ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                          "GetObject")
    assert isinstance(caught.value, TransientStorageError) == transient
    assert "s3://b/k" in str(caught.value) and code in str(caught.value)
    assert only_io_errors(None, None, type("State", (), {"data": caught.value})()) == transient


@pytest.mark.parametrize("error, retried", [
    (ConnectionResetError("reset"), True), (TimeoutError("slow"), True), (FileNotFoundError("gone"), False),
    (PermissionError("no"), False),
])
def test_os_errors_are_retried_only_when_they_may_pass(error, retried):
    from tasks.retry import only_io_errors

    assert only_io_errors(None, None, type("State", (), {"data": error})()) == retried


def test_missing_credentials_are_not_retried():
    from botocore.exceptions import NoCredentialsError

    from tasks.retry import only_io_errors
    from vidopt.storage import StorageError, s3_errors

    with pytest.raises(StorageError, match="no usable AWS credentials") as caught, s3_errors("s3://b/k"):
        raise NoCredentialsError()
    assert not only_io_errors(None, None, type("State", (), {"data": caught.value})())
    assert not only_io_errors(None, None, type("State", (), {"data": NoCredentialsError()})())
