"""Secrets never printed: the one redaction helper, and the flow-run parameters a deployment refuses."""

import pytest

from imagegen.errors import ImagegenError, redact


@pytest.mark.parametrize(("text", "expected"), [
    ("postgresql+asyncpg://imagegen:9f2a@127.0.0.1:15432/prefect",
     "postgresql+asyncpg://imagegen:***@127.0.0.1:15432/prefect"),
    ("at http://team:p%40ss:w@host:5000 and s3://key:secret@bucket/x",
     "at http://team:***@host:5000 and s3://key:***@bucket/x"),
    ("http://127.0.0.1:5000/api (no user) user@example.org", "http://127.0.0.1:5000/api (no user) user@example.org"),
])
def test_redact_hides_the_password_of_every_uri(text, expected):
    assert redact(text) == expected


def test_every_expected_error_is_redacted_whoever_builds_it():
    assert str(ImagegenError("MLflow tracking at http://u:pw@h:1 failed")) == "MLflow tracking at http://u:***@h:1 failed"


def test_a_deployments_run_refuses_a_foreign_checkout_and_bad_values():
    from pipelines.retrain import REPO_ROOT, rejected_parameter

    ok = dict(repo=None, target="prepare", fetch_retries=3, fetch_retry_delay_s=10.0, deployed=True)
    assert rejected_parameter(**ok) is None
    assert rejected_parameter(**{**ok, "repo": str(REPO_ROOT / "pipelines" / "..")}) is None
    assert rejected_parameter(**{**ok, "repo": "/tmp", "deployed": False}) is None  # a local call: the caller's folder
    for key, value in (("repo", "/tmp"), ("target", "-R"), ("target", "a b"), ("fetch_retries", -1),
                       ("fetch_retries", 10**6), ("fetch_retries", True), ("fetch_retry_delay_s", float("nan")),
                       ("fetch_retry_delay_s", 1e9)):
        message = rejected_parameter(**{**ok, key: value})
        assert message is not None and message.startswith(f"parameter '{key}': "), (key, value, message)
        assert "\n" not in message


def test_the_pools_job_template_lets_a_run_change_no_command_env_or_folder():
    from pipelines.deploy import locked_job_template

    template = locked_job_template()
    assert template["job_configuration"] == {"name": "{{ name }}", "labels": "{{ labels }}", "stream_output": True}
    assert set(template["variables"]["properties"]) == {"name", "labels"}
    assert template["variables"]["additionalProperties"] is False
