"""The parts of `treeserve local` on their own: ports, S3 notifications -> SQS -> handler, demo."""

from __future__ import annotations

import json
import os
import socket
import tarfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import xgboost as xgb

from treeserve.errors import ConfigurationError
from treeserve_cli import demo
from treeserve_cli.local import (
    NotificationPoller,
    PortInUse,
    check_ports,
    failed_message_ids,
    reserve_port,
    sqs_event,
    start_moto,
)

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- ports ---------------------------------------------------------------------------------------


def test_a_port_in_use_is_named_with_its_option() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"port {port} \(API\) is already in use.*--port"):
            check_ports(port, free_port())
        with pytest.raises(PortInUse, match=rf"port {port} \(embedded AWS.*--moto-port"):
            check_ports(free_port(), port)


def test_the_api_port_stays_reserved_until_released() -> None:
    api_port = free_port()
    sock = check_ports(api_port, free_port())
    sock.listen()  # as uvicorn does with the socket it is handed
    try:
        with pytest.raises(PortInUse):
            reserve_port(api_port, "API", "--port")
    finally:
        sock.close()
    reserve_port(api_port, "API", "--port").close()


def test_same_port_twice_and_out_of_range_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="different ports"):
        check_ports(4000, 4000)
    with pytest.raises(ConfigurationError, match="1 to 65535"):
        reserve_port(70000, "API", "--port")


# --- S3 notifications through SQS to a handler, on a real moto server ---------------------------


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    port = free_port()
    server = start_moto(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def clients(endpoint: str) -> tuple[Any, Any]:
    kw: dict[str, Any] = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    return boto3.client("s3", **kw), boto3.client("sqs", **kw)


def notified_queue(endpoint: str, bucket: str, visibility: int = 30) -> tuple[str, str]:
    s3, sqs = clients(endpoint)
    s3.create_bucket(Bucket=bucket)
    url = sqs.create_queue(
        QueueName=f"{bucket}-events", Attributes={"VisibilityTimeout": str(visibility)}
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "incoming/"}]}},
                }
            ]
        },
    )
    return url, arn


def s3_keys(event: dict[str, Any]) -> list[str]:
    keys = []
    for record in event["Records"]:
        assert record["eventSource"] == "aws:sqs"
        body = json.loads(record["body"])
        for s3_record in body.get("Records", []):
            keys.append(urllib.parse.unquote_plus(s3_record["s3"]["object"]["key"]))
    return keys


def drain(poller: NotificationPoller, rounds: int = 5) -> None:
    for _ in range(rounds):
        poller.poll_once()


def test_uploads_under_the_prefix_reach_the_handler_once(moto_server: str) -> None:
    url, arn = notified_queue(moto_server, "treeserve-parts-ok")
    s3, sqs = clients(moto_server)
    seen: list[str] = []
    poller = NotificationPoller(
        url, arn, lambda e: seen.extend(s3_keys(e)), sqs=sqs, wait_seconds=0
    )
    s3.put_object(Bucket="treeserve-parts-ok", Key="incoming/default/a model.ubj", Body=b"1")
    s3.put_object(Bucket="treeserve-parts-ok", Key="captures/default/x.jsonl.gz", Body=b"2")
    drain(poller)
    assert seen == ["incoming/default/a model.ubj"]  # the other prefix is not notified
    assert poller.handled >= 1
    drain(poller)  # deleted after success: never handed over twice
    assert seen == ["incoming/default/a model.ubj"]


def test_a_failing_invocation_is_retried_and_partial_failures_stay(moto_server: str) -> None:
    url, arn = notified_queue(moto_server, "treeserve-parts-retry", visibility=1)
    s3, sqs = clients(moto_server)
    calls: list[list[str]] = []

    def flaky(event: dict[str, Any]) -> Any:
        calls.append(s3_keys(event))
        if len(calls) == 1:
            raise RuntimeError("first invocation fails")
        return {"batchItemFailures": []}

    poller = NotificationPoller(url, arn, flaky, sqs=sqs, wait_seconds=0)
    s3.put_object(Bucket="treeserve-parts-retry", Key="incoming/default/m.ubj", Body=b"1")
    deadline = time.monotonic() + 10
    while len([c for c in calls if "incoming/default/m.ubj" in c]) < 2:
        assert time.monotonic() < deadline, calls
        poller.poll_once()
        time.sleep(0.2)
    assert poller.failed == 1
    time.sleep(1.2)  # past the visibility timeout: a deleted message does not come back
    before = len(calls)
    drain(poller)
    assert [c for c in calls[before:] if "incoming/default/m.ubj" in c] == []


def test_sqs_event_shape_and_batch_item_failures() -> None:
    event = sqs_event(
        [{"MessageId": "m1", "ReceiptHandle": "r1", "Body": "{}", "MD5OfBody": "x"}],
        "arn:aws:sqs:us-east-1:123456789012:q",
    )
    (record,) = event["Records"]
    assert record["messageId"] == "m1"
    assert record["eventSourceARN"].endswith(":q")
    assert record["body"] == "{}"
    assert failed_message_ids({"batchItemFailures": [{"itemIdentifier": "m1"}]}) == {"m1"}
    assert failed_message_ids(None) is None


# --- the demo dataset and model ------------------------------------------------------------------


def test_demo_dataset_is_the_real_one() -> None:
    data = demo.load_dataset()
    assert data.X.shape == (569, 30)
    assert int(data.y.sum()) == 212  # malignant, as UCI documents
    assert data.feature_names[0] == "mean_radius"
    assert np.isfinite(data.X).all()


def test_demo_package_trains_a_good_model_and_packs_it(tmp_path: Path) -> None:
    pkg = demo.write_demo_package(tmp_path)
    with tarfile.open(pkg.package) as tar:
        assert sorted(tar.getnames()) == [
            "holdout.csv",
            "manifest.json",
            "model.ubj",
            "reference.csv",
        ]
    booster = xgb.Booster(model_file=str(pkg.model))
    assert booster.feature_names == pkg.feature_names
    assert pkg.holdout_auc > 0.95
    # the example rows are real holdout rows, one per class, with the model agreeing
    preds = booster.inplace_predict(np.asarray(pkg.example_rows))
    assert pkg.example_labels == [1, 0]
    assert preds[0] > 0.5 > preds[1]
    header = pkg.holdout.read_text().splitlines()[0].split(",")
    assert header == [*pkg.feature_names, demo.LABEL]
    # the same inputs give the same package (a fixed split and seed)
    again = demo.write_demo_package(tmp_path / "again")
    assert again.model.read_bytes() == pkg.model.read_bytes()


# --- the plan read from template.yaml, and the resources it creates ------------------------------


def test_the_stack_plan_comes_from_the_template() -> None:
    from tests.conftest import ROOT
    from treeserve_cli.local import read_stack
    from treeserve_cli.template import load_template

    spec = read_stack(load_template(ROOT / "template.yaml", region="us-east-1"))
    assert spec.bucket == "treeserve-us-east-1-123456789012"  # the template's !Sub, resolved
    assert spec.versioned
    assert spec.incoming_prefix == "incoming/"
    assert spec.incoming_events == ["s3:ObjectCreated:*"]
    assert spec.refresh.logical_id == "RefreshFunction"
    assert spec.inference.logical_id == "InferenceFunction"
    assert spec.monitoring is not None
    assert spec.monitoring.logical_id == "MonitoringFunction"
    assert spec.refresh_failure_queue in spec.queues
    assert spec.inference.environment["MODEL_BUCKET"] == spec.bucket
    assert spec.topics  # the alarm topic the refresh function notifies
    assert spec.refresh.environment["NOTIFICATION_TOPIC_ARN"].endswith(":" + spec.topics[0])


def test_resources_are_created_and_uploads_notify_the_queue(moto_server: str) -> None:
    from tests.conftest import ROOT
    from treeserve_cli.local import create_resources, read_stack
    from treeserve_cli.template import load_template

    spec = read_stack(load_template(ROOT / "template.yaml", region="us-east-1"))
    kw: dict[str, Any] = {"endpoint_url": moto_server, "region_name": "us-east-1"}
    s3, sqs, sns = (boto3.client(name, **kw) for name in ("s3", "sqs", "sns"))
    made = create_resources(spec, s3=s3, sqs=sqs, sns=sns)
    assert s3.get_bucket_versioning(Bucket=spec.bucket)["Status"] == "Enabled"
    topics = [t["TopicArn"] for t in sns.list_topics()["Topics"]]
    assert set(made.topic_arns.values()) <= set(topics)
    assert spec.refresh.environment["NOTIFICATION_TOPIC_ARN"] in topics  # the env points at it
    redrive = json.loads(
        sqs.get_queue_attributes(
            QueueUrl=made.notification_queue_url, AttributeNames=["RedrivePolicy"]
        )["Attributes"]["RedrivePolicy"]
    )
    assert redrive["deadLetterTargetArn"].endswith(":" + str(spec.refresh_failure_queue))
    seen: list[str] = []
    poller = NotificationPoller(
        made.notification_queue_url,
        made.notification_queue_arn,
        lambda e: seen.extend(s3_keys(e)),
        sqs=sqs,
        wait_seconds=0,
    )
    s3.put_object(Bucket=spec.bucket, Key="incoming/default/m.ubj", Body=b"x")
    drain(poller)
    assert seen == ["incoming/default/m.ubj"]


def test_demo_auc_is_the_pairwise_definition() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, size=40).astype(float)
        y[:2] = [0, 1]
        scores = rng.integers(0, 6, size=40).astype(float)  # many ties
        pos, neg = scores[y == 1], scores[y == 0]
        pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert demo.auc(y, scores) == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)


# --- docs/local.md stays runnable ----------------------------------------------------------------


def doc_commands(prefix: str) -> list[str]:
    """Commands of docs/local.md's ```sh blocks that start with ``prefix`` (continuations joined)."""
    import re

    from tests.conftest import ROOT

    text = (ROOT / "docs" / "local.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith(prefix):
                commands.append(" ".join(line.split()))
    return commands


def test_every_treeserve_command_in_the_walkthrough_parses() -> None:
    import shlex

    from treeserve_cli.cli import build_parser

    commands = doc_commands(".venv/bin/treeserve ")
    assert len(commands) >= 8
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)[1:]
        if "--help" in argv:
            with pytest.raises(SystemExit) as exited:
                parser.parse_args(argv)
            assert exited.value.code == 0
        else:
            parser.parse_args(argv)  # SystemExit (a usage error) fails the test
    demo_commands = doc_commands(".venv/bin/python -m treeserve_cli.demo ")
    assert demo_commands
    for command in demo_commands:
        with pytest.raises(SystemExit) as exited:
            demo.main([*shlex.split(command)[3:], "--help"])
        assert exited.value.code == 0


# moto's server thread dies on the taken port, as it should; the warning says just that.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_moto_losing_its_port_after_the_check_is_an_error_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from treeserve.errors import TreeserveError
    from treeserve_cli import local

    monkeypatch.setattr(local, "MOTO_START_SECONDS", 1.0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(
            TreeserveError, match=rf"did not start on 127.0.0.1:{port}.*--moto-port"
        ):
            start_moto(port)
        assert time.monotonic() - started < 5


# --- monitoring's fan-out over the stack's own Step Functions endpoint --------------------------


def test_a_long_window_fans_out_over_the_stacks_own_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local stack's wiring (start_step_functions) with MONITORING_FANOUT_BYTES=1: the
    monitoring function plans, starts MonitoringMap on the stack's endpoint (its
    MONITORING_STATE_MACHINE_ARN), the runner runs the workers and the merge through the
    template's handler, and the report written is the one a single run over the window gives."""
    from datetime import datetime

    from moto import mock_aws

    from tests.conftest import ROOT, train
    from tests.integration.test_events import http, load_event, promote_through_refresh
    from treeserve.aws import reset_clients, s3_client
    from treeserve.monitoring.pipeline import run_monitoring
    from treeserve.serving.capture import wait_for_writes
    from treeserve.settings import Settings
    from treeserve_cli.invoke import invoke
    from treeserve_cli.local import (
        LocalOptions,
        LocalStack,
        context_for,
        function_env,
        load_handler,
        own_env,
        read_stack,
        start_step_functions,
    )
    from treeserve_cli.stepfunctions import state_machines
    from treeserve_cli.template import load_template

    template = load_template(ROOT / "template.yaml", region="us-east-1")
    spec = read_stack(template)
    assert spec.monitoring is not None
    options = LocalOptions(env={"MONITORING_FANOUT_BYTES": "1"}, sfn_port=free_port())
    env = function_env(spec, options.env)
    for name in ("AWS_ENDPOINT_URL_SFN", "BATCH_STATE_MACHINE_ARN", *env):
        monkeypatch.setenv(name, env.get(name, ""))  # restored after: the stack sets them
    reset_clients()
    with mock_aws():
        s3 = s3_client()
        s3.create_bucket(Bucket=spec.bucket)
        promote_through_refresh(template, s3, train("binary:logistic"))
        overrides = {"Parameters": {"CAPTURE_SAMPLE_RATE": "1", "CAPTURE_MAX_ROWS": "1"}}
        for _ in range(3):  # three requests, three capture files
            predict = invoke(
                template,
                "InferenceFunction",
                load_event("apigw-v2-predict-rows.json"),
                env_overrides=overrides,
                fresh=True,
            )
            assert http(predict).status == 200
            wait_for_writes()

        stack = LocalStack(options, spec=spec)
        monitor = load_handler(spec.monitoring, own_env(spec.monitoring, options.env))
        stack.handlers[spec.monitoring.logical_id] = monitor
        start_step_functions(stack, template, options)
        try:
            assert stack.step_functions is not None
            map_arn = state_machines(template)["MonitoringMap"].arn
            assert stack.monitoring_map_arn == map_arn
            assert stack.state_machine_arn == state_machines(template)["BatchStateMachine"].arn
            assert os.environ["MONITORING_STATE_MACHINE_ARN"] == map_arn
            assert os.environ["AWS_ENDPOINT_URL_SFN"] == stack.step_functions.url

            planned = monitor({"hours": 24}, context_for(spec.monitoring))
            assert planned["status"] == "fanned out", planned
            assert planned["files"] == 3
            assert planned["execution_arn"].startswith(
                map_arn.replace(":stateMachine:", ":execution:")
            )
            execution = stack.step_functions.service.execution(planned["execution_arn"])
            assert execution.done.wait(300)
            assert execution.status == "SUCCEEDED", (execution.error, execution.cause)
            summary = json.loads(execution.output or "null")
        finally:
            stack.stop()
        key = summary["report_key"]
        report = json.loads(s3.get_object(Bucket=spec.bucket, Key=key)["Body"].read())
        settings = Settings.from_env()
        start, end = (datetime.fromisoformat(planned[k]) for k in ("start", "end"))
        single = run_monitoring(
            spec.bucket,
            "default",
            start,
            end,
            rule=settings.drift_rule,
            settings=settings,
            write=False,
        )
    reset_clients()
    assert summary["rows"] == single["rows"] == 6
    volatile = ("generated_at", "report_key")
    assert {k: v for k, v in report.items() if k not in volatile} == json.loads(
        json.dumps({k: v for k, v in single.items() if k not in volatile})
    )


def test_a_monitoring_arn_that_names_no_served_machine_is_refused() -> None:
    from tests.conftest import ROOT
    from treeserve_cli.local import state_machine_env
    from treeserve_cli.stepfunctions import state_machines
    from treeserve_cli.template import load_template

    template = load_template(ROOT / "template.yaml", region="us-east-1")
    machines = state_machines(template)
    wiring = state_machine_env(template, machines)
    assert wiring == {
        "BATCH_STATE_MACHINE_ARN": machines["BatchStateMachine"].arn,
        "MONITORING_STATE_MACHINE_ARN": machines["MonitoringMap"].arn,
    }
    del machines["MonitoringMap"]
    with pytest.raises(ConfigurationError, match="MONITORING_STATE_MACHINE_ARN"):
        state_machine_env(template, machines)
