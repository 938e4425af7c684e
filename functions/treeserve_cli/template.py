"""Read template.yaml the way `sam local` does, with intrinsic functions resolved to local values.

``load_template(path)`` parses the SAM template (CloudFormation short-form tags such as ``!Ref``,
``!Sub`` and ``!GetAtt`` included), merges ``Globals`` into every function and resolves
intrinsics against parameter defaults (or overrides) and local pseudo parameters (region from
``AWS_DEFAULT_REGION``, moto's account id, stack name ``treeserve``). References to resources
become the names the local stack gives them (the bucket's own resolved ``BucketName``; a topic's
ARN, a queue's URL); anything that cannot be known locally becomes ``<unresolved ...>``.

Used by ``treeserve invoke`` (functions: code folder, handler, environment) and by
``treeserve local`` (bucket, its notifications, topics, queues).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from treeserve.errors import ConfigurationError

LOCAL_ACCOUNT_ID = "123456789012"  # moto's default account
LOCAL_STACK_NAME = "treeserve"
_NO_VALUE = object()  # AWS::NoValue: the property disappears

SHORT_TAGS = {
    "Ref": "Ref",
    "Condition": "Condition",
    "GetAtt": "Fn::GetAtt",
    "Sub": "Fn::Sub",
    "If": "Fn::If",
    "Join": "Fn::Join",
    "Select": "Fn::Select",
    "Split": "Fn::Split",
    "Equals": "Fn::Equals",
    "Not": "Fn::Not",
    "And": "Fn::And",
    "Or": "Fn::Or",
    "FindInMap": "Fn::FindInMap",
    "GetAZs": "Fn::GetAZs",
    "ImportValue": "Fn::ImportValue",
    "Base64": "Fn::Base64",
    "Cidr": "Fn::Cidr",
    "Transform": "Fn::Transform",
    "ToJsonString": "Fn::ToJsonString",
    "Length": "Fn::Length",
}


class _CfnLoader(yaml.SafeLoader):
    """A safe YAML loader that turns ``!Tag value`` into ``{"Fn::Tag": value}``."""


def _make_constructor(name: str) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
            if name == "Fn::GetAtt" and isinstance(value, str):
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
        return {name: value}

    return construct


for _tag, _name in SHORT_TAGS.items():
    _CfnLoader.add_constructor(f"!{_tag}", _make_constructor(_name))


def parse_template(text: str) -> dict[str, Any]:
    """Parse a CloudFormation/SAM template (YAML or JSON) into plain data."""
    data = yaml.load(text, Loader=_CfnLoader)  # noqa: S506 - a SafeLoader subclass
    if not isinstance(data, dict) or "Resources" not in data:
        raise ConfigurationError("template: not a CloudFormation template (no Resources)")
    return data


def _merge_globals(global_props: Mapping[str, Any], props: Mapping[str, Any]) -> dict[str, Any]:
    """SAM's rule: maps merge (the resource wins), lists add up (globals first), scalars override."""
    merged: dict[str, Any] = dict(global_props)
    for key, value in props.items():
        base = merged.get(key)
        if isinstance(base, dict) and isinstance(value, dict) and not _is_intrinsic(value):
            merged[key] = _merge_globals(base, value)
        elif isinstance(base, list) and isinstance(value, list):
            merged[key] = [*base, *value]
        else:
            merged[key] = value
    return merged


def _is_intrinsic(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) == 1
        and next(iter(value))
        in {
            "Ref",
            "Condition",
            *SHORT_TAGS.values(),
        }
    )


@dataclass(frozen=True)
class FunctionDef:
    """One ``AWS::Serverless::Function`` with Globals merged and intrinsics resolved."""

    logical_id: str
    code_uri: Path  # the function's own folder: its handler module is here
    project_root: Path  # Metadata.ProjectRootDirectory: what a makefile build may reach
    makefile_dir: Path  # Metadata.ContextPath: where the build's Makefile is
    handler: str
    runtime: str
    timeout: int
    memory_size: int
    architectures: tuple[str, ...]
    environment: dict[str, str]
    events: dict[str, dict[str, Any]]
    properties: dict[str, Any] = field(repr=False)

    @property
    def module_file(self) -> Path:
        """The handler's module file, e.g. functions/inference/app.py for ``app.handler``."""
        module = self.handler.rsplit(".", 1)[0]
        return self.code_uri / (module.replace(".", "/") + ".py")

    @property
    def function_name(self) -> str:
        return str(self.properties.get("FunctionName") or f"{LOCAL_STACK_NAME}-{self.logical_id}")


@dataclass(frozen=True)
class BucketNotification:
    """An S3 event source: objects created under ``prefix`` (and ``suffix``) invoke ``function``."""

    function: str
    bucket: str
    events: tuple[str, ...]
    prefix: str = ""
    suffix: str = ""

    def matches(self, event_name: str, key: str) -> bool:
        """Whether an S3 event (``s3:ObjectCreated:Put``) on ``key`` triggers the function."""
        return (
            any(_event_matches(pattern, event_name) for pattern in self.events)
            and key.startswith(self.prefix)
            and key.endswith(self.suffix)
        )


def _event_matches(pattern: str, event_name: str) -> bool:
    if pattern.endswith("*"):
        return event_name.startswith(pattern[:-1])
    return pattern == event_name


class Template:
    """A loaded template. Build it with :func:`load_template`."""

    def __init__(
        self,
        data: dict[str, Any],
        root: Path,
        *,
        parameter_overrides: Mapping[str, str] | None = None,
        region: str | None = None,
        account_id: str = LOCAL_ACCOUNT_ID,
        stack_name: str = LOCAL_STACK_NAME,
    ) -> None:
        self.data = data
        self.root = root
        self.resources: dict[str, dict[str, Any]] = data.get("Resources", {})
        self.pseudo = {
            "AWS::Region": region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            "AWS::AccountId": account_id,
            "AWS::StackName": stack_name,
            "AWS::StackId": f"arn:aws:cloudformation:{region or 'us-east-1'}:{account_id}:stack/{stack_name}/local",
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::NotificationARNs": [],
        }
        self.parameters = self._parameters(parameter_overrides or {})
        self._conditions: dict[str, bool] = {}

    # --- parameters and conditions ---------------------------------------------------------

    def _parameters(self, overrides: Mapping[str, str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        declared = self.data.get("Parameters", {}) or {}
        unknown = set(overrides) - set(declared)
        if unknown:
            raise ConfigurationError(f"template: unknown parameters {sorted(unknown)}")
        for name, spec in declared.items():
            raw = overrides.get(name, spec.get("Default"))
            if raw is None:
                raise ConfigurationError(
                    f"template: parameter {name} has no default: pass it as an override"
                )
            allowed = spec.get("AllowedValues")
            if allowed is not None and str(raw) not in {str(a) for a in allowed}:
                raise ConfigurationError(f"template: {name}={raw!r} is not one of {allowed}")
            if str(spec.get("Type", "String")).startswith(("CommaDelimitedList", "List<")):
                text = str(raw)
                values[name] = [item.strip() for item in text.split(",")] if text else [""]
            else:
                values[name] = str(raw) if not isinstance(raw, str) else raw
        return values

    def condition(self, name: str) -> bool:
        """The value of a condition of the template's ``Conditions`` section."""
        if name not in self._conditions:
            conditions = self.data.get("Conditions", {}) or {}
            if name not in conditions:
                raise ConfigurationError(f"template: unknown condition {name}")
            self._conditions[name] = bool(self.resolve(conditions[name]))
        return self._conditions[name]

    # --- resource names the local stack uses -----------------------------------------------

    def ref(self, name: str) -> Any:
        """What ``!Ref name`` is locally."""
        if name in self.pseudo:
            return self.pseudo[name]
        if name == "AWS::NoValue":
            return _NO_VALUE
        if name in self.parameters:
            return self.parameters[name]
        resource = self.resources.get(name)
        if resource is None:
            return f"<unresolved Ref {name}>"
        kind = resource.get("Type", "")
        props = resource.get("Properties", {}) or {}
        region, account = self.pseudo["AWS::Region"], self.pseudo["AWS::AccountId"]
        if kind == "AWS::S3::Bucket":
            return self._name(props.get("BucketName"), name).lower()
        if kind == "AWS::SNS::Topic":
            return f"arn:aws:sns:{region}:{account}:{self._name(props.get('TopicName'), name)}"
        if kind == "AWS::SQS::Queue":
            return f"https://sqs.{region}.amazonaws.com/{account}/{self.queue_name(name)}"
        if kind in ("AWS::Serverless::Function", "AWS::Lambda::Function"):
            return self._name(props.get("FunctionName"), name)
        if kind == "AWS::Logs::LogGroup":
            return self._name(props.get("LogGroupName"), name)
        return f"<unresolved Ref {name}>"

    def _name(self, explicit: Any, logical_id: str) -> str:
        if explicit is not None:
            return str(self.resolve(explicit))
        return f"{self.pseudo['AWS::StackName']}-{logical_id}"

    def queue_name(self, logical_id: str) -> str:
        """The local name of an SQS queue resource."""
        props = self.resources[logical_id].get("Properties", {}) or {}
        return self._name(props.get("QueueName"), logical_id)

    def get_att(self, name: str, attribute: str) -> Any:
        """What ``!GetAtt name.attribute`` is locally."""
        resource = self.resources.get(name)
        if resource is None:
            return f"<unresolved GetAtt {name}.{attribute}>"
        kind = resource.get("Type", "")
        region, account = self.pseudo["AWS::Region"], self.pseudo["AWS::AccountId"]
        if kind == "AWS::S3::Bucket" and attribute == "Arn":
            return f"arn:aws:s3:::{self.ref(name)}"
        if kind == "AWS::SQS::Queue":
            if attribute == "Arn":
                return f"arn:aws:sqs:{region}:{account}:{self.queue_name(name)}"
            if attribute == "QueueName":
                return self.queue_name(name)
            if attribute == "QueueUrl":
                return self.ref(name)
        if kind == "AWS::SNS::Topic" and attribute == "TopicArn":
            return self.ref(name)
        if kind in ("AWS::Serverless::Function", "AWS::Lambda::Function") and attribute == "Arn":
            return f"arn:aws:lambda:{region}:{account}:function:{self.ref(name)}"
        if kind == "AWS::Logs::LogGroup" and attribute == "Arn":
            return f"arn:aws:logs:{region}:{account}:log-group:{self.ref(name)}:*"
        return f"<unresolved GetAtt {name}.{attribute}>"

    # --- intrinsic functions ---------------------------------------------------------------

    def resolve(self, value: Any) -> Any:
        """Resolve every intrinsic function inside ``value``."""
        if isinstance(value, list):
            items = [self.resolve(v) for v in value]
            return [v for v in items if v is not _NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            key, arg = next(iter(value.items()))
            if key == "Ref":
                return self.ref(str(arg))
            if key == "Condition":
                return self.condition(str(arg))
            handler = getattr(self, "_fn_" + key.removeprefix("Fn::").lower(), None)
            if key.startswith("Fn::") and handler is not None:
                return handler(arg)
            if key.startswith("Fn::"):
                return f"<unresolved {key}>"
        resolved = {k: self.resolve(v) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v is not _NO_VALUE}

    def _fn_getatt(self, arg: Any) -> Any:
        name, attribute = arg if isinstance(arg, list) else str(arg).split(".", 1)
        return self.get_att(str(name), str(self.resolve(attribute)))

    _SUB = re.compile(r"\$\{([^}]*)\}")

    def _fn_sub(self, arg: Any) -> str:
        if isinstance(arg, list):
            text, variables = str(arg[0]), {k: self.resolve(v) for k, v in arg[1].items()}
        else:
            text, variables = str(arg), {}

        def replace(match: re.Match[str]) -> str:
            token = match.group(1)
            if token.startswith("!"):
                return "${" + token[1:] + "}"
            if token in variables:
                return str(variables[token])
            if "." in token and token.split(".", 1)[0] in self.resources:
                name, attribute = token.split(".", 1)
                return str(self.get_att(name, attribute))
            return str(self.ref(token))

        return self._SUB.sub(replace, text)

    def _fn_if(self, arg: list[Any]) -> Any:
        name, when_true, when_false = arg
        return self.resolve(when_true if self.condition(str(name)) else when_false)

    def _fn_equals(self, arg: list[Any]) -> bool:
        left, right = (self.resolve(v) for v in arg)
        return str(left) == str(right)

    def _fn_not(self, arg: list[Any]) -> bool:
        return not self.resolve(arg[0])

    def _fn_and(self, arg: list[Any]) -> bool:
        return all(self.resolve(v) for v in arg)

    def _fn_or(self, arg: list[Any]) -> bool:
        return any(self.resolve(v) for v in arg)

    def _fn_join(self, arg: list[Any]) -> str:
        delimiter, items = arg
        return str(delimiter).join(str(v) for v in self.resolve(items))

    def _fn_select(self, arg: list[Any]) -> Any:
        index, items = arg
        return self.resolve(items)[int(self.resolve(index))]

    def _fn_split(self, arg: list[Any]) -> list[str]:
        delimiter, text = arg
        return str(self.resolve(text)).split(str(delimiter))

    def _fn_findinmap(self, arg: list[Any]) -> Any:
        mapping, top, second = (self.resolve(v) for v in arg[:3])
        return self.data.get("Mappings", {})[mapping][top][second]

    def _fn_getazs(self, arg: Any) -> list[str]:
        region = self.resolve(arg) or self.pseudo["AWS::Region"]
        return [f"{region}a", f"{region}b", f"{region}c"]

    def _fn_base64(self, arg: Any) -> str:
        return base64.b64encode(str(self.resolve(arg)).encode()).decode()

    # --- functions -------------------------------------------------------------------------

    def functions(self) -> dict[str, FunctionDef]:
        """Every serverless function, by logical id."""
        globals_ = (self.data.get("Globals", {}) or {}).get("Function", {}) or {}
        found: dict[str, FunctionDef] = {}
        for logical_id, resource in self.resources.items():
            if resource.get("Type") != "AWS::Serverless::Function":
                continue
            props = self.resolve(_merge_globals(globals_, resource.get("Properties", {}) or {}))
            metadata = resource.get("Metadata", {}) or {}
            code_uri = self.root / str(props.get("CodeUri", "."))
            env = (props.get("Environment") or {}).get("Variables") or {}
            found[logical_id] = FunctionDef(
                logical_id=logical_id,
                code_uri=code_uri,
                project_root=self.root / str(metadata.get("ProjectRootDirectory") or "."),
                makefile_dir=self.root / str(metadata.get("ContextPath") or "."),
                handler=str(props.get("Handler", "")),
                runtime=str(props.get("Runtime", "")),
                timeout=int(props.get("Timeout", 3)),
                memory_size=int(props.get("MemorySize", 128)),
                architectures=tuple(props.get("Architectures") or ["x86_64"]),
                environment={k: _env_text(v) for k, v in env.items()},
                events=props.get("Events") or {},
                properties=props,
            )
        return found

    def function(self, name: str) -> FunctionDef:
        """A function by logical id (``InferenceFunction``) or short name (``inference``)."""
        functions = self.functions()
        if name in functions:
            return functions[name]
        for logical_id, fn in functions.items():
            if name.lower() in (logical_id.lower(), logical_id.lower().removesuffix("function")):
                return fn
        raise ConfigurationError(
            f"template: no function {name!r}; the template has {', '.join(sorted(functions))}"
        )

    # --- what the local stack creates ------------------------------------------------------

    def resources_of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        """Resources of a CloudFormation/SAM type, with properties resolved."""
        return {
            logical_id: self.resolve(resource.get("Properties", {}) or {})
            for logical_id, resource in self.resources.items()
            if resource.get("Type") == kind
        }

    def bucket_name(self, logical_id: str | None = None) -> str:
        """The (only, or named) bucket's resolved name."""
        buckets = self.resources_of_type("AWS::S3::Bucket")
        if logical_id is None:
            if len(buckets) != 1:
                raise ConfigurationError(f"template: expected one bucket, found {sorted(buckets)}")
            logical_id = next(iter(buckets))
        return str(self.ref(logical_id))

    def bucket_notifications(self) -> list[BucketNotification]:
        """S3 events of functions (SAM ``Type: S3`` events) with their key filters."""
        found: list[BucketNotification] = []
        for logical_id, fn in self.functions().items():
            for event in fn.events.values():
                if event.get("Type") != "S3":
                    continue
                props = event.get("Properties", {})
                events = props.get("Events", [])
                prefix = suffix = ""
                for rule in ((props.get("Filter") or {}).get("S3Key") or {}).get("Rules", []):
                    if str(rule.get("Name")).lower() == "prefix":
                        prefix = str(rule.get("Value"))
                    elif str(rule.get("Name")).lower() == "suffix":
                        suffix = str(rule.get("Value"))
                found.append(
                    BucketNotification(
                        function=logical_id,
                        bucket=str(props.get("Bucket")),
                        events=tuple([events] if isinstance(events, str) else events),
                        prefix=prefix,
                        suffix=suffix,
                    )
                )
        return found

    def topics(self) -> dict[str, str]:
        """SNS topics: logical id -> local ARN."""
        return {lid: str(self.ref(lid)) for lid in self.resources_of_type("AWS::SNS::Topic")}

    def queues(self) -> dict[str, str]:
        """SQS queues: logical id -> local queue name."""
        return {lid: self.queue_name(lid) for lid in self.resources_of_type("AWS::SQS::Queue")}


def _env_text(value: Any) -> str:
    """Lambda environment values are strings (CloudFormation turns numbers and booleans into text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def load_template(
    path: str | os.PathLike[str] = "template.yaml",
    *,
    parameter_overrides: Mapping[str, str] | None = None,
    region: str | None = None,
    stack_name: str = LOCAL_STACK_NAME,
) -> Template:
    """Load and parse ``path``; relative CodeUri and Metadata paths are relative to its folder."""
    file = Path(path).resolve()
    if not file.is_file():
        raise ConfigurationError(
            f"template: {path} not found (run from the project root or pass --template)"
        )
    return Template(
        parse_template(file.read_text(encoding="utf-8")),
        file.parent,
        parameter_overrides=parameter_overrides,
        region=region,
        stack_name=stack_name,
    )
