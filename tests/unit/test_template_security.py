"""Security properties of template.yaml, read from the template SAM transforms it into.

The template is translated with samtranslator (what CloudFormation runs on deploy), so the roles
SAM generates (policies, destinations) are checked too, not only what the YAML spells out.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from treeserve_cli.template import Template, load_template, parse_template

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
API_FUNCTIONS = ("InferenceFunction",)
API_GATEWAY_LIMIT_SECONDS = 30


class _NoManagedPolicies:
    def load(self) -> dict[str, str]:
        return {}


def transform(parameters: dict[str, str] | None = None) -> dict[str, Any]:
    """template.yaml through the SAM transform (CodeUri pointed at S3, as after `sam package`)."""
    from samtranslator.translator.transform import transform as sam_transform

    data = parse_template(TEMPLATE.read_text())
    data = copy.deepcopy(data)
    data["Globals"]["Function"]["CodeUri"] = "s3://artifacts/treeserve.zip"
    for resource in data["Resources"].values():
        resource.get("Properties", {}).pop("CodeUri", None)
    return sam_transform(data, parameters or {}, _NoManagedPolicies())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cfn() -> dict[str, Any]:
    return transform()  # the region comes from AWS_DEFAULT_REGION (tests/conftest.py)


@pytest.fixture(scope="module")
def template() -> Template:
    return load_template(TEMPLATE)


def of_type(cfn: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in cfn["Resources"].items() if v["Type"] == kind}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def identity_statements(cfn: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every statement of every IAM identity policy (inline role policies and policies)."""
    found = []
    for name, res in cfn["Resources"].items():
        props = res.get("Properties", {})
        if res["Type"] == "AWS::IAM::Role":
            for policy in props.get("Policies", []):
                found += [(name, s) for s in as_list(policy["PolicyDocument"]["Statement"])]
        elif res["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            found += [(name, s) for s in as_list(props["PolicyDocument"]["Statement"])]
    return found


def is_wildcard_action(action: Any) -> bool:
    return isinstance(action, str) and (action == "*" or action.endswith(":*"))


def test_the_transform_produces_roles_with_inline_policies(cfn: dict[str, Any]) -> None:
    roles = of_type(cfn, "AWS::IAM::Role")
    assert set(roles) >= {"InferenceFunctionRole", "RefreshFunctionRole", "MonitoringFunctionRole"}
    assert len(identity_statements(cfn)) >= 10


def test_no_identity_policy_has_a_wildcard_action_or_a_star_resource(cfn: dict[str, Any]) -> None:
    for name, statement in identity_statements(cfn):
        if statement.get("Effect") != "Allow":
            continue
        actions = as_list(statement.get("Action", []))
        assert not any(is_wildcard_action(a) for a in actions), (name, statement)
        assert "*" not in as_list(statement.get("Resource")), (name, statement)
        assert "NotAction" not in statement, (name, statement)
        assert "NotResource" not in statement, (name, statement)


def test_managed_policies_are_only_the_lambda_basics(cfn: dict[str, Any]) -> None:
    allowed = {"AWSLambdaBasicExecutionRole", "AWSXrayWriteOnlyAccess"}
    for name, role in of_type(cfn, "AWS::IAM::Role").items():
        for arn in role["Properties"].get("ManagedPolicyArns", []):
            assert isinstance(arn, str), (name, arn)
            assert arn.rsplit("/", 1)[-1] in allowed, (name, arn)


def test_s3_permissions_are_scoped_to_each_functions_prefixes(cfn: dict[str, Any]) -> None:
    def prefixes(role: str, action: str) -> set[str]:
        found: set[str] = set()
        for name, statement in identity_statements(cfn):
            if name == role and action in as_list(statement["Action"]):
                for resource in as_list(statement["Resource"]):
                    text = resource["Fn::Sub"] if isinstance(resource, dict) else resource
                    found.add(text.split("}/", 1)[1] if "}/" in text else "<bucket>")
        return found

    assert prefixes("InferenceFunctionRole", "s3:GetObject") == {"registry/*"}
    assert prefixes("InferenceFunctionRole", "s3:PutObject") == {"captures/*"}
    assert prefixes("RefreshFunctionRole", "s3:GetObject") == {"incoming/*", "registry/*"}
    assert prefixes("RefreshFunctionRole", "s3:PutObject") == {"registry/*"}
    assert prefixes("MonitoringFunctionRole", "s3:GetObject") == {
        "captures/*",
        "labels/*",
        "registry/*",
        "monitoring/*",  # the fan-out's manifest, partial states and map results
    }
    # PromotionMode=live: monitoring moves the pointer, clears the routing, records decisions;
    # the fan-out's manifest and partial states live under monitoring/.
    assert prefixes("MonitoringFunctionRole", "s3:PutObject") == {
        "reports/*",
        "monitoring/*",
        "registry/*/current.json",
        "registry/*/routing.json",
        "registry/*/decisions/*",
    }
    assert prefixes("MonitoringMapRole", "s3:GetObject") == {"monitoring/*"}
    assert prefixes("MonitoringMapRole", "s3:PutObject") == {"monitoring/*"}
    assert prefixes("BatchFunctionRole", "s3:GetObject") == {"registry/*", "batch/*"}
    assert prefixes("BatchFunctionRole", "s3:PutObject") == {"batch/*"}
    assert prefixes("BatchStateMachineRole", "s3:PutObject") == {"batch/*"}
    assert prefixes("BatchStateMachineRole", "s3:ListBucket") == {"<bucket>"}
    for name, statement in identity_statements(cfn):
        if "s3:ListBucket" in as_list(statement["Action"]):
            # StringLike (the state machine's ItemReader always names a prefix) or, for the
            # functions, StringLikeIfExists (see InferenceFunction in template.yaml).
            (operator,) = statement["Condition"]
            assert operator in ("StringLike", "StringLikeIfExists"), (name, operator)
            condition = statement["Condition"][operator]["s3:prefix"]
            assert all(p.endswith("/*") and p != "/*" for p in condition), (name, condition)
        for action in as_list(statement["Action"]):
            assert action not in {"s3:DeleteObject", "s3:PutBucketPolicy", "s3:PutObjectAcl"}


def test_bucket_is_encrypted_versioned_private_and_tls_only(cfn: dict[str, Any]) -> None:
    (bucket,) = of_type(cfn, "AWS::S3::Bucket").values()
    props = bucket["Properties"]
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert props["VersioningConfiguration"]["Status"] == "Enabled"
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    rules = props["LifecycleConfiguration"]["Rules"]
    by_prefix = {r["Prefix"]: r for r in rules if "Prefix" in r}
    assert by_prefix["captures/"]["ExpirationInDays"] > 0
    assert by_prefix["reports/"]["ExpirationInDays"] > 0
    assert any("NoncurrentVersionExpiration" in r for r in rules)

    (policy,) = of_type(cfn, "AWS::S3::BucketPolicy").values()
    statements = as_list(policy["Properties"]["PolicyDocument"]["Statement"])
    deny_tls = [
        s
        for s in statements
        if s["Effect"] == "Deny"
        and s["Principal"] == "*"
        and s["Action"] == "s3:*"
        and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    ]
    assert deny_tls, statements
    resources = as_list(deny_tls[0]["Resource"])
    assert len(resources) == 2  # the bucket and every object in it
    assert not [s for s in statements if s["Effect"] == "Allow" and s.get("Principal") == "*"]


def test_s3_event_invokes_refresh_only_for_incoming(cfn: dict[str, Any]) -> None:
    (bucket,) = of_type(cfn, "AWS::S3::Bucket").values()
    (config,) = bucket["Properties"]["NotificationConfiguration"]["LambdaConfigurations"]
    assert config["Function"] == {"Fn::GetAtt": ["RefreshFunction", "Arn"]}
    assert config["Filter"]["S3Key"]["Rules"] == [{"Name": "prefix", "Value": "incoming/"}]


def default_route(cfn: dict[str, Any]) -> dict[str, Any]:
    """The API's catch-all route (SAM writes `$default` as `/$default` with FailOnWarnings)."""
    (api,) = of_type(cfn, "AWS::ApiGatewayV2::Api").values()
    (path,) = api["Properties"]["Body"]["paths"]
    assert path in ("$default", "/$default")
    route: dict[str, Any] = api["Properties"]["Body"]["paths"][path][
        "x-amazon-apigateway-any-method"
    ]
    assert route["isDefaultRoute"] is True
    return route


def _default_route_security(cfn: dict[str, Any]) -> Any:
    (api,) = of_type(cfn, "AWS::ApiGatewayV2::Api").values()
    body = api["Properties"]["Body"]
    route = default_route(cfn)
    assert route["x-amazon-apigateway-integration"]["payloadFormatVersion"] == "2.0"
    return route["security"], body["components"]["securitySchemes"]


def test_api_auth_is_on_by_default_and_off_only_by_explicit_choice(
    cfn: dict[str, Any], template: Template
) -> None:
    spec = template.data["Parameters"]["ApiAuth"]
    assert spec["Default"] == "IAM"
    assert set(spec["AllowedValues"]) == {"IAM", "JWT", "NONE"}

    security, schemes = _default_route_security(cfn)
    # CloudFormation resolves Fn::If in the body; resolve it as deployed with each value.
    for value, expected in (("IAM", [{"AWS_IAM": []}]), ("JWT", [{"JwtAuthorizer": []}])):
        local = load_template(TEMPLATE, parameter_overrides={"ApiAuth": value})
        assert local.resolve(security) == expected
        resolved = local.resolve(schemes)
        (scheme_name,) = expected[0]
        assert scheme_name in resolved
    assert template.resolve(security) == [{"AWS_IAM": []}]
    assert template.resolve(schemes)["AWS_IAM"]["x-amazon-apigateway-authtype"] == "awsSigv4"
    jwt = load_template(
        TEMPLATE,
        parameter_overrides={"ApiAuth": "JWT", "JwtIssuer": "https://issuer.example"},
    ).resolve(schemes)["JwtAuthorizer"]["x-amazon-apigateway-authorizer"]
    assert jwt["type"] == "jwt"
    assert jwt["jwtConfiguration"]["issuer"] == "https://issuer.example"
    opted_out = load_template(TEMPLATE, parameter_overrides={"ApiAuth": "NONE"})
    assert opted_out.resolve(security) == []
    assert opted_out.resolve({"securitySchemes": schemes}) == {}  # nothing unused declared
    # Every choice transforms (SAM adds the integration to the same default route).
    for value in ("JWT", "NONE"):
        extra = {"JwtIssuer": "https://issuer.example"} if value == "JWT" else {}
        assert default_route(transform({"ApiAuth": value, **extra}))["security"] == security


def test_jwt_without_an_issuer_is_refused_at_deploy(template: Template) -> None:
    rule = template.data["Rules"]["JwtNeedsAnIssuer"]
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "ApiAuth"}, "JWT"]}
    (assertion,) = rule["Assertions"]
    assert assertion["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "JwtIssuer"}, ""]}]}


def test_inference_has_snapstart_and_the_api_calls_its_alias(cfn: dict[str, Any]) -> None:
    fn = cfn["Resources"]["InferenceFunction"]["Properties"]
    assert fn["SnapStart"] == {"ApplyOn": "PublishedVersions"}
    alias = cfn["Resources"]["InferenceFunctionAliaslive"]
    assert alias["Type"] == "AWS::Lambda::Alias"
    assert alias["Properties"]["Name"] == "live"
    route = default_route(cfn)
    assert (
        "${InferenceFunctionAliaslive}"
        in route["x-amazon-apigateway-integration"]["uri"]["Fn::Sub"]
    )


def test_refresh_and_monitoring_have_bounded_retries_and_an_encrypted_failure_queue(
    cfn: dict[str, Any],
) -> None:
    configs = {
        v["Properties"]["FunctionName"]["Ref"]: v["Properties"]
        for v in of_type(cfn, "AWS::Lambda::EventInvokeConfig").values()
    }
    assert set(configs) == {"RefreshFunction", "MonitoringFunction"}
    for props in configs.values():
        assert 0 <= props["MaximumRetryAttempts"] <= 2
        assert props["MaximumEventAgeInSeconds"] <= 6 * 3600
        destination = props["DestinationConfig"]["OnFailure"]["Destination"]
        assert destination == {"Fn::GetAtt": ["RefreshFailureQueue", "Arn"]}
    queue = cfn["Resources"]["RefreshFailureQueue"]["Properties"]
    assert queue.get("KmsMasterKeyId") or queue.get("SqsManagedSseEnabled")
    # SAM gives the role the right to send there; the key policy lets the role use the key.
    role = cfn["Resources"]["RefreshFunctionRole"]["Properties"]
    sends = [
        s
        for p in role["Policies"]
        for s in as_list(p["PolicyDocument"]["Statement"])
        if "sqs:SendMessage" in as_list(s["Action"])
    ]
    assert sends


def test_timeouts_fit_api_gateway_and_every_function_has_a_retained_log_group(
    cfn: dict[str, Any],
) -> None:
    functions = of_type(cfn, "AWS::Lambda::Function")
    for name in API_FUNCTIONS:
        assert functions[name]["Properties"]["Timeout"] < API_GATEWAY_LIMIT_SECONDS
    groups = of_type(cfn, "AWS::Logs::LogGroup")
    for group in groups.values():
        assert group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
    for name, fn in functions.items():
        log_group = fn["Properties"]["LoggingConfig"]["LogGroup"]
        assert log_group["Ref"] in groups, name
    (stage,) = of_type(cfn, "AWS::ApiGatewayV2::Stage").values()
    destination = stage["Properties"]["AccessLogSettings"]["DestinationArn"]
    assert destination["Fn::GetAtt"][0] in groups
    assert "$context.requestId" in stage["Properties"]["AccessLogSettings"]["Format"]
    assert "body" not in stage["Properties"]["AccessLogSettings"]["Format"].lower()


def test_topic_and_key_allow_cloudwatch_alarms_and_no_one_else(cfn: dict[str, Any]) -> None:
    topic = cfn["Resources"]["AlarmTopic"]["Properties"]
    assert topic["KmsMasterKeyId"] == {"Ref": "MessagesKey"}
    key = cfn["Resources"]["MessagesKey"]["Properties"]
    assert key["EnableKeyRotation"] is True
    for statement in key["KeyPolicy"]["Statement"]:
        assert statement["Principal"] != "*"
        principal = statement["Principal"]
        assert "Service" in principal or principal["AWS"] == {
            "Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"
        }
    alarms = of_type(cfn, "AWS::CloudWatch::Alarm")
    metrics = {a["Properties"].get("MetricName") for a in alarms.values()} | {
        found[1]
        for a in alarms.values()
        for m in a["Properties"].get("Metrics", [])
        if (found := re.search(r"SELECT MAX\((\w+)\)", m["Expression"]))
    }
    assert metrics >= {
        "5xx",
        "Latency",
        "Throttles",
        "Errors",
        "ModelsRejected",
        "ModelReloadFailures",
        "DriftedFeatures",
        "ApproximateNumberOfMessagesVisible",
    }
    for alarm in alarms.values():
        assert alarm["Properties"]["AlarmActions"] == [{"Ref": "AlarmTopic"}]


def test_every_checkov_skip_has_a_justification(template: Template) -> None:
    skips = [
        (name, skip)
        for name, res in template.resources.items()
        for skip in ((res.get("Metadata") or {}).get("checkov") or {}).get("skip", [])
    ]
    assert skips  # the template does skip some checks; each must say why
    for name, skip in skips:
        assert skip["id"].startswith("CKV_"), (name, skip)
        assert len(skip.get("comment", "")) >= 40, (name, skip)


DEPLOY_ALARMS = (
    "InferenceNewVersion5xxAlarm",
    "InferenceNewVersionErrorsAlarm",
    "InferenceNewVersionLatencyAlarm",
)


def test_code_deploys_shift_traffic_gradually_gated_on_the_new_versions_alarms(
    cfn: dict[str, Any], template: Template
) -> None:
    resources = cfn["Resources"]
    fn = template.data["Resources"]["InferenceFunction"]["Properties"]
    preference = fn["DeploymentPreference"]
    assert preference["Type"] == {"Ref": "InferenceDeploymentType"}
    parameter = template.data["Parameters"]["InferenceDeploymentType"]
    assert parameter["Default"] == "Canary10Percent5Minutes"
    assert "AllAtOnce" in parameter["AllowedValues"]
    assert [a["Ref"] for a in preference["Alarms"]] == list(DEPLOY_ALARMS)
    # The alias `live` (what the API calls) is updated by CodeDeploy, in the group below.
    update = resources["InferenceFunctionAliaslive"]["UpdatePolicy"]["CodeDeployLambdaAliasUpdate"]
    group = resources[update["DeploymentGroupName"]["Ref"]]
    assert group["Type"] == "AWS::CodeDeploy::DeploymentGroup"
    props = group["Properties"]
    assert props["DeploymentConfigName"]["Fn::Sub"][1] == {"ConfigName": "Canary10Percent5Minutes"}
    assert props["AlarmConfiguration"]["Enabled"] is True
    assert [a["Name"]["Ref"] for a in props["AlarmConfiguration"]["Alarms"]] == list(DEPLOY_ALARMS)
    rollback = props["AutoRollbackConfiguration"]
    assert rollback["Enabled"] is True
    assert "DEPLOYMENT_STOP_ON_ALARM" in rollback["Events"]
    assert props["ServiceRoleArn"] == {"Fn::GetAtt": ["InferenceDeployRole", "Arn"]}
    # Each alarm exists and watches the version being deployed (not the whole API's traffic).
    version = resources["InferenceFunctionAliaslive"]["Properties"]["FunctionVersion"]
    assert version["Fn::GetAtt"][0] in resources
    for name in DEPLOY_ALARMS:
        alarm = resources[name]
        assert alarm["Type"] == "AWS::CloudWatch::Alarm"
        dims = {d["Name"]: d["Value"] for d in alarm["Properties"]["Dimensions"]}
        watched = dims.get("ExecutedVersion", dims.get("function_version"))
        assert watched == version, (name, dims)
        if alarm["Properties"]["Namespace"] == "AWS/Lambda":
            assert dims["Resource"] == {"Fn::Sub": "${InferenceFunction}:live"}
        else:  # the function's own count of 5xx answers, by the version that gave them
            assert alarm["Properties"]["MetricName"] == "ServerErrors"
            assert set(dims) == {"function_version"}
    # and the role CodeDeploy uses can do what it must, no more
    statements = resources["InferenceDeployRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    actions = {a for s in statements["Statement"] for a in as_list(s["Action"])}
    assert actions == {
        "lambda:GetAlias",
        "lambda:UpdateAlias",
        "lambda:GetProvisionedConcurrencyConfig",
        "cloudwatch:DescribeAlarms",
    }


def test_the_5xx_metric_of_the_deploy_alarm_is_what_the_function_emits() -> None:
    from treeserve.serving.api import SERVER_ERRORS_METRIC

    data = parse_template(TEMPLATE.read_text())
    alarm = data["Resources"]["InferenceNewVersion5xxAlarm"]["Properties"]
    assert alarm["MetricName"] == SERVER_ERRORS_METRIC
    assert (
        alarm["Namespace"]
        == data["Globals"]["Function"]["Environment"]["Variables"]["POWERTOOLS_METRICS_NAMESPACE"]
    )
