"""template.yaml as `treeserve invoke` and `treeserve local` read it, and the handlers it names."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from treeserve.errors import ConfigurationError
from treeserve.settings import DRIFT_METHODS, MAX_DRIFT_THRESHOLD, DriftRule, Settings
from treeserve_cli.cli import main
from treeserve_cli.invoke import (
    environment,
    function_environment,
    import_handler,
    module_name,
    runtime_environment,
)
from treeserve_cli.template import Template, load_template, parse_template

pytestmark = pytest.mark.integration

TEMPLATE = ROOT / "template.yaml"
FUNCTIONS = ("InferenceFunction", "RefreshFunction", "MonitoringFunction", "BatchFunction")


@pytest.fixture(scope="module")
def template() -> Template:
    return load_template(TEMPLATE)


# --- the template as read locally --------------------------------------------------------------


def test_functions_have_globals_merged_and_environment_resolved(template: Template) -> None:
    functions = template.functions()
    assert set(functions) == set(FUNCTIONS)
    bucket = template.bucket_name()
    assert bucket == "treeserve-us-east-1-123456789012"
    for fn in functions.values():
        assert fn.runtime == "python3.12"
        assert fn.handler == "app.handler"
        # SAM's layout: CodeUri is the function's own folder; the build reaches the project root.
        assert fn.code_uri == ROOT / "functions" / fn.logical_id.removesuffix("Function").lower()
        assert fn.project_root == ROOT
        assert fn.makefile_dir == ROOT
        assert fn.environment["MODEL_BUCKET"] == bucket  # Globals, !Sub with pseudo parameters
        assert fn.environment["MODEL_NAME"] == "default"  # Globals, !Ref parameter default
        assert fn.environment["POWERTOOLS_SERVICE_NAME"].startswith("treeserve-")  # the function's
        assert all(isinstance(v, str) for v in fn.environment.values())
        assert not any(v.startswith("<unresolved") for v in fn.environment.values())
    inference = functions["InferenceFunction"]
    assert inference.environment["MAX_ROWS"] == "10000"  # a Number parameter, as text
    assert inference.timeout < 30
    refresh = functions["RefreshFunction"]
    assert refresh.environment["NOTIFICATION_TOPIC_ARN"] == template.topics()["AlarmTopic"]
    # Refresh judges models against the inference function's own memory and request limits.
    assert inference.memory_size == 1024
    assert refresh.environment["INFERENCE_MEMORY_MB"] == str(inference.memory_size)
    assert refresh.environment["MAX_ROWS"] == inference.environment["MAX_ROWS"]
    assert refresh.memory_size == 3008


def test_the_inference_memory_is_one_parameter_for_both_functions() -> None:
    t = load_template(TEMPLATE, parameter_overrides={"InferenceMemoryMB": "2048"})
    assert t.function("inference").memory_size == 2048
    assert t.function("refresh").environment["INFERENCE_MEMORY_MB"] == "2048"
    settings = Settings.from_env(t.function("refresh").environment)
    assert settings.inference_memory_mb == 2048


def test_drift_rule_parameters_agree_with_settings(template: Template) -> None:
    params = template.data["Parameters"]
    assert tuple(params["DriftMethod"]["AllowedValues"]) == DRIFT_METHODS
    assert params["DriftMethod"]["Default"] == DriftRule().method
    assert float(params["DriftThreshold"]["Default"]) == DriftRule().threshold
    env = template.function("MonitoringFunction").environment
    assert Settings.from_env(env).drift_rule == DriftRule()
    for method in DRIFT_METHODS:  # every allowed value, at the parameter's bounds, is accepted
        for bound in ("MinValue", "MaxValue"):
            value = min(float(params["DriftThreshold"][bound]), MAX_DRIFT_THRESHOLD[method])
            t = load_template(
                TEMPLATE, parameter_overrides={"DriftMethod": method, "DriftThreshold": str(value)}
            )
            rule = Settings.from_env(t.function("MonitoringFunction").environment).drift_rule
            assert rule == DriftRule(method, value)


def test_parameter_overrides_change_the_environment() -> None:
    t = load_template(
        TEMPLATE,
        parameter_overrides={"ModelName": "churn", "PromotionMode": "manual", "MaxRows": "5"},
    )
    assert t.function("RefreshFunction").environment["MODEL_NAME"] == "churn"
    assert t.function("refresh").environment["PROMOTION_MODE"] == "manual"
    assert t.function("inference").environment["MAX_ROWS"] == "5"
    # monitoring acts on live verdicts with the same mode and tolerance as refresh
    t = load_template(
        TEMPLATE,
        parameter_overrides={
            "PromotionMode": "live",
            "PromotionTolerance": "0.01",
            "LiveMinLabeledRows": "800",
        },
    )
    monitoring = Settings.from_env(t.function("MonitoringFunction").environment)
    refresh = Settings.from_env(t.function("RefreshFunction").environment)
    assert (monitoring.promotion_mode, monitoring.promotion_tolerance) == ("live", 0.01)
    assert (refresh.promotion_mode, refresh.promotion_tolerance) == ("live", 0.01)
    assert (monitoring.live_min_labeled_rows, monitoring.challenger_max_rows) == (800, 20_000)
    with pytest.raises(ConfigurationError, match="not one of"):
        load_template(TEMPLATE, parameter_overrides={"PromotionMode": "sometimes"})
    with pytest.raises(ConfigurationError, match="unknown parameters"):
        load_template(TEMPLATE, parameter_overrides={"NoSuchParameter": "x"})


def test_resources_the_local_stack_creates(template: Template) -> None:
    (notification,) = template.bucket_notifications()
    assert notification.function == "RefreshFunction"
    assert notification.bucket == template.bucket_name()
    assert notification.prefix == "incoming/"
    assert notification.matches("s3:ObjectCreated:Put", "incoming/default/model.ubj")
    assert not notification.matches("s3:ObjectCreated:Put", "registry/default/current.json")
    assert not notification.matches("s3:ObjectRemoved:Delete", "incoming/default/model.ubj")
    assert template.topics() == {
        "AlarmTopic": "arn:aws:sns:us-east-1:123456789012:treeserve-AlarmTopic"
    }
    assert template.queues() == {"RefreshFailureQueue": "treeserve-RefreshFailureQueue"}
    destination = template.function("RefreshFunction").properties["EventInvokeConfig"]
    assert destination["DestinationConfig"]["OnFailure"]["Destination"] == (
        "arn:aws:sqs:us-east-1:123456789012:treeserve-RefreshFailureQueue"
    )
    schedule = template.function("MonitoringFunction").events["Schedule"]
    assert schedule["Properties"]["Schedule"] == "rate(1 hour)"


def test_short_form_intrinsics_resolve() -> None:
    text = """
Parameters:
  Env: {Type: String, Default: dev}
  Names: {Type: CommaDelimitedList, Default: "a,b"}
Conditions:
  IsProd: !Equals [!Ref Env, prod]
Mappings:
  Sizes: {dev: {Memory: 512}}
Resources:
  Queue: {Type: AWS::SQS::Queue, Properties: {QueueName: !Sub "${Env}-q"}}
  Other:
    Type: AWS::Custom::Thing
    Properties:
      Sub: !Sub "${AWS::Region}/${Queue.Arn}/${!Literal}"
      SubVars: !Sub ["${X}-${Env}", {X: !Select [1, !Ref Names]}]
      Join: !Join ["-", [!Ref Env, !GetAtt Queue.QueueName]]
      If: !If [IsProd, big, small]
      Not: !Not [!Condition IsProd]
      Map: !FindInMap [Sizes, !Ref Env, Memory]
      Split: !Split [",", "x,y"]
      Gone: !If [IsProd, here, !Ref AWS::NoValue]
      Unknown: !GetAtt Nowhere.Arn
"""
    t = Template(parse_template(text), ROOT)
    props = t.resolve(t.resources["Other"]["Properties"])
    assert props["Sub"] == "us-east-1/arn:aws:sqs:us-east-1:123456789012:dev-q/${Literal}"
    assert props["SubVars"] == "b-dev"
    assert props["Join"] == "dev-dev-q"
    assert props["If"] == "small"
    assert props["Not"] is True
    assert props["Map"] == 512
    assert props["Split"] == ["x", "y"]
    assert "Gone" not in props
    assert props["Unknown"].startswith("<unresolved")


def test_unknown_function_names_the_ones_that_exist(template: Template) -> None:
    with pytest.raises(ConfigurationError, match="InferenceFunction"):
        template.function("Nope")


def test_parse_rejects_what_is_not_a_template() -> None:
    with pytest.raises(ConfigurationError):
        parse_template("just: text\n")
    with pytest.raises(ConfigurationError, match="not found"):
        load_template(ROOT / "no-such-template.yaml")


# --- every handler resolves --------------------------------------------------------------------


@pytest.mark.parametrize("logical_id", FUNCTIONS)
def test_every_handler_resolves_to_a_function_in_its_own_folder(
    logical_id: str, template: Template, aws: None
) -> None:
    from treeserve.aws import s3_client

    fn = template.function(logical_id)
    if not fn.module_file.exists() and logical_id == "MonitoringFunction":
        pytest.skip("functions/monitoring/app.py is not written yet")
    assert fn.module_file.is_file(), fn.module_file
    assert fn.module_file.parent == fn.code_uri
    s3_client().create_bucket(Bucket=template.bucket_name())  # inference reads S3 at import
    env = runtime_environment(fn, function_environment(fn))
    with environment(env):
        handler = import_handler(fn.code_uri, fn.handler, fresh=True)
    assert callable(handler)
    module = sys.modules[module_name(fn.code_uri, "app")]
    assert Path(str(module.__file__)).resolve() == fn.module_file.resolve()
    assert module.handler is handler


def test_handlers_of_different_functions_are_different_modules(
    template: Template, aws: None
) -> None:
    from treeserve.aws import s3_client

    s3_client().create_bucket(Bucket=template.bucket_name())
    handlers = []
    for logical_id in ("InferenceFunction", "RefreshFunction"):
        fn = template.function(logical_id)
        with environment(runtime_environment(fn, function_environment(fn))):
            handlers.append(import_handler(fn.code_uri, fn.handler, fresh=True))
    assert handlers[0] is not handlers[1]
    names = {module_name(template.function(f).code_uri, "app") for f in FUNCTIONS}
    assert len(names) == len(FUNCTIONS)


def test_import_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"module\.function"):
        import_handler(tmp_path, "handler")
    with pytest.raises(ConfigurationError, match="does not exist"):
        import_handler(tmp_path, "app.handler")
    (tmp_path / "app.py").write_text("value = 1\n")
    with pytest.raises(ConfigurationError, match="no callable"):
        import_handler(tmp_path, "app.handler", fresh=True)


# --- environment handling ----------------------------------------------------------------------


def test_env_vars_overrides_follow_sams_format(template: Template) -> None:
    fn = template.function("RefreshFunction")
    env = function_environment(
        fn,
        {
            "Parameters": {"LOG_LEVEL": "DEBUG"},
            "RefreshFunction": {"PROMOTION_MODE": "manual"},
            "InferenceFunction": {"PROMOTION_MODE": "never-applied"},
        },
    )
    assert env["LOG_LEVEL"] == "DEBUG"
    assert env["PROMOTION_MODE"] == "manual"
    assert function_environment(fn, {"MODEL_NAME": "flat"})["MODEL_NAME"] == "flat"


def test_the_shells_endpoint_and_credentials_are_never_overridden(
    template: Template, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = template.function("InferenceFunction")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")
    env = runtime_environment(
        fn, function_environment(fn, {"AWS_ENDPOINT_URL": "https://elsewhere", "X": "1"})
    )
    assert "AWS_ENDPOINT_URL" not in env
    assert "AWS_ACCESS_KEY_ID" not in env
    assert env["X"] == "1"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == str(fn.memory_size)
    with environment(env):
        assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:5000"
        assert os.environ["MODEL_BUCKET"] == template.bucket_name()
    assert "MODEL_BUCKET" not in os.environ or os.environ["MODEL_BUCKET"] != env["MODEL_BUCKET"]


# --- the command -------------------------------------------------------------------------------


def run_cli(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capfd.readouterr()
    return code, out, err


def test_cli_prints_the_result_alone_on_stdout(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    code, out, _err = run_cli(
        ["invoke", "RefreshFunction", "--event", "events/s3-test-event.json"], capfd
    )
    assert code == 0
    assert json.loads(out) == {"outcomes": []}


def test_cli_reports_a_failed_invocation_like_the_runtime(
    capfd: pytest.CaptureFixture[str], aws: None, tmp_path: Path
) -> None:
    # No bucket in this moto world: the refresh handler cannot read the upload and raises.
    event = json.loads((ROOT / "events" / "s3-put-incoming.json").read_text())
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))
    code, out, err = run_cli(
        ["invoke", "refresh", "--event", str(path), "--template", str(TEMPLATE)], capfd
    )
    assert code == 1
    error: dict[str, Any] = json.loads(out)
    assert set(error) >= {"errorMessage", "errorType", "requestId", "stackTrace"}
    assert error["errorType"]
    assert "raised" in err


def test_cli_errors_for_a_bad_event_or_function(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _out, err = run_cli(
        ["invoke", "RefreshFunction", "--event", str(bad), "--template", str(TEMPLATE)], capfd
    )
    assert code == 1
    assert "not JSON" in err
    code, _out, err = run_cli(
        [
            "invoke",
            "Nope",
            "--event",
            str(ROOT / "events" / "s3-test-event.json"),
            "--template",
            str(TEMPLATE),
        ],
        capfd,
    )
    assert code == 1
    assert "RefreshFunction" in err


# --- the build SAM runs ------------------------------------------------------------------------


def test_every_function_builds_through_its_own_makefile_target(template: Template) -> None:
    """`sam build` runs `make build-<LogicalId>` from the Makefile in ContextPath with
    ARTIFACTS_DIR set; the recipe works whatever folder make runs in (here: CodeUri)."""
    metadata = {lid: template.resources[lid].get("Metadata", {}) for lid in FUNCTIONS}
    for logical_id, meta in metadata.items():
        assert meta["BuildMethod"] == "makefile", logical_id
        fn = template.function(logical_id)
        assert (fn.makefile_dir / "Makefile").is_file()
        assert fn.module_file.is_file()
        dry_run = subprocess.run(
            [
                "make",
                "-n",
                "-f",
                str(fn.makefile_dir / "Makefile"),
                f"build-{logical_id}",
                "ARTIFACTS_DIR=/tmp/sam-artifacts",
            ],
            cwd=fn.code_uri,
            capture_output=True,
            text=True,
            check=False,
        )
        assert dry_run.returncode == 0, dry_run.stderr
        short = logical_id.removesuffix("Function").lower()
        assert f'cd "{fn.project_root}"' in dry_run.stdout
        assert f"-m infra.build --function {short}" in dry_run.stdout
        assert '--out "/tmp/sam-artifacts"' in dry_run.stdout
    # SAM builds functions whose CodeUri, runtime, handler and Metadata all match only once;
    # their own CodeUri keeps the three builds apart.
    assert len({template.function(lid).code_uri for lid in FUNCTIONS}) == len(FUNCTIONS)


def test_the_console_script_against_a_moto_server(template: Template, tmp_path: Path) -> None:
    """As a user runs it: `treeserve invoke` in a shell whose AWS_ENDPOINT_URL is a moto server."""
    import urllib.request

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=template.bucket_name()
        )
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "POWERTOOLS_TRACE_DISABLED": "true"}
        proc = subprocess.run(
            [
                str(Path(sys.executable).with_name("treeserve")),
                "invoke",
                "InferenceFunction",
                "--event",
                "events/apigw-v2-health.json",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        response = json.loads(proc.stdout)  # stdout holds the result alone
        assert response["statusCode"] == 503  # no model promoted in this fresh world
        assert json.loads(response["body"])["error"]["message"]
    finally:
        reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")  # noqa: S310
        urllib.request.urlopen(reset).close()  # noqa: S310 - the loopback URL built above
        server.stop()


def test_dashboard_body_is_valid_json_with_every_widget_resolved(template: Template) -> None:
    body = template.resolve(template.resources["Dashboard"]["Properties"]["DashboardBody"])
    widgets = json.loads(body)["widgets"]
    assert len(widgets) >= 4
    assert "<unresolved" not in body.replace("<unresolved Ref HttpApi>", "")  # API id: deploy-time
    metrics = {
        m[1]
        for w in widgets
        for m in w["properties"]["metrics"]
        if len(m) > 1 and isinstance(m[1], str)
    }
    assert {"5xx", "Latency", "ModelsRejected", "DriftedFeatures"} <= metrics
    # One series per model, found by a SEARCH over the model dimension (no widget per model).
    searches = [
        m[0]["expression"]
        for w in widgets
        for m in w["properties"]["metrics"]
        if isinstance(m[0], dict) and "expression" in m[0]
    ]
    assert any(
        "SEARCH('{Treeserve,model,service}" in e and 'MetricName="DriftedFeatures"' in e
        for e in searches
    )


@pytest.mark.parametrize(
    ("alarm", "metric"),
    [("DriftAlarm", "DriftedFeatures"), ("DataQualityAlarm", "QualityFlaggedFeatures")],
)
def test_monitoring_alarms_have_one_contributor_per_model(
    template: Template, alarm: str, metric: str
) -> None:
    """A Metrics Insights query grouped by model: every model of the stack alarms on its own,
    with no template change per model, over the namespace, service and metric the monitoring
    function emits (its template environment; the per-model series of emit_metrics)."""
    from treeserve.monitoring import pipeline

    assert metric in (pipeline.METRIC_DRIFTED_FEATURES, pipeline.METRIC_QUALITY_FLAGS)
    env = template.function("MonitoringFunction").environment
    props = template.resources[alarm]["Properties"]
    assert "MetricName" not in props
    (query,) = props["Metrics"]
    assert query["ReturnData"] is True
    expression = " ".join(query["Expression"].split())
    namespace, service = env["POWERTOOLS_METRICS_NAMESPACE"], env["POWERTOOLS_SERVICE_NAME"]
    expected = " ".join(
        [
            f"SELECT MAX({metric}) FROM SCHEMA({namespace}, model, service)",  # noqa: S608 -- a CloudWatch query, not SQL run anywhere
            f"WHERE service = '{service}' GROUP BY model",
        ]
    )
    assert expression == expected
    assert props["AlarmActions"] == [{"Ref": "AlarmTopic"}]


def test_the_glue_table_is_the_capture_formats_own(template: Template) -> None:
    """template.yaml's Glue table is what treeserve.captures.glue_table_input gives for the
    bucket (columns, types, comments, partition projection): they cannot drift apart."""
    from treeserve.captures import glue_table_input

    table = template.resources["CapturesTable"]["Properties"]
    expected = glue_table_input(f"s3://{template.bucket_name()}/captures/")
    assert template.resolve(table["TableInput"]) == expected
    assert table["DatabaseName"] == {"Ref": "CapturesDatabase"}
    database = template.resolve(template.resources["CapturesDatabase"]["Properties"])
    assert re.fullmatch(r"[a-z0-9_]+", database["DatabaseInput"]["Name"])
