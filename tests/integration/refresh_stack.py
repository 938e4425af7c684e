"""The refresh tests' stack: moto S3 notifying an SQS queue, the real handler, SNS to a queue.

Uploads go through S3; the notification messages moto really emits are received from the queue
and handed to the refresh handler, either as the SQS event Lambda's trigger would build or as
the raw S3 notification (what S3 sends a function directly).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import xgboost as xgb

from tests.conftest import BUCKET, ROOT, LambdaContext, TrainedModel, make_data
from tests.corpus import csv_bytes
from treeserve.registry.model_registry import ModelRegistry, upload_id
from treeserve.registry.store import S3RegistryStore

REFRESH_DIR = ROOT / "functions" / "refresh"
INFERENCE_DIR = ROOT / "functions" / "inference"


def sqs_event(messages: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    """The event Lambda's SQS trigger builds from received messages."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            }
            for m in messages
        ]
    }


def emf_metrics(stdout: str) -> list[str]:
    """Names of the EMF metrics printed to stdout (one per data point)."""
    names: list[str] = []
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if "_aws" not in doc:
            continue
        for directive in doc["_aws"]["CloudWatchMetrics"]:
            for metric in directive["Metrics"]:
                value = doc[metric["Name"]]
                names.extend([metric["Name"]] * (len(value) if isinstance(value, list) else 1))
    return names


@dataclass
class RefreshStack:
    s3: Any
    sqs: Any
    queue_url: str
    queue_arn: str
    notes_url: str
    topic_arn: str
    handler: Callable[[dict[str, Any], Any], Any]
    module: Any
    etags: dict[str, str] = field(default_factory=dict)
    test_events: list[dict[str, Any]] = field(default_factory=list)

    def put(self, key: str, data: bytes) -> list[dict[str, Any]]:
        """Upload through S3 and return the notification messages S3 (moto) sent the queue."""
        response = self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        self.etags[key] = response["ETag"].strip('"')
        return self.receive()

    def receive(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        while True:
            got = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10, VisibilityTimeout=0
            ).get("Messages", [])
            if not got:
                return messages
            for m in got:
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=m["ReceiptHandle"])
            messages.extend(got)

    def sqs_event(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return sqs_event(messages, self.queue_arn)

    def invoke(self, event: dict[str, Any]) -> Any:
        return self.handler(event, LambdaContext())

    def deliver_s3(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each message body as the event S3 sends a function directly; the outcomes."""
        outcomes: list[dict[str, Any]] = []
        for m in messages:
            outcomes.extend(self.invoke(json.loads(m["Body"]))["outcomes"])
        return outcomes

    def deliver_sqs(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = self.invoke(self.sqs_event(messages))
        return result

    def registry(self, name: str = "default") -> ModelRegistry:
        return ModelRegistry(S3RegistryStore(BUCKET, self.s3), name)

    def outcome(self, key: str, name: str = "default") -> dict[str, Any] | None:
        return self.registry(name).outcome(upload_id(key, self.etags[key]))

    def notifications(self) -> list[dict[str, Any]]:
        """SNS notifications published to the topic (raw delivery to a queue)."""
        notes = []
        while True:
            got = self.sqs.receive_message(QueueUrl=self.notes_url, MaxNumberOfMessages=10).get(
                "Messages", []
            )
            if not got:
                return notes
            for m in got:
                self.sqs.delete_message(QueueUrl=self.notes_url, ReceiptHandle=m["ReceiptHandle"])
                body = json.loads(m["Body"])
                notes.append(json.loads(body["Message"]) if "Message" in body else body)


def build_stack(monkeypatch: pytest.MonkeyPatch, s3: Any, **env: str) -> RefreshStack:
    """Queue + notification configuration + topic, the environment, a cold refresh handler."""
    from treeserve.aws import sns_client, sqs_client
    from treeserve_cli.invoke import import_handler

    sqs = sqs_client()
    queue_url = sqs.create_queue(QueueName="refresh-uploads")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=BUCKET,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": queue_arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "incoming/"}]}},
                }
            ]
        },
    )
    sns = sns_client()
    topic_arn = sns.create_topic(Name="treeserve-alarms")["TopicArn"]
    notes_url = sqs.create_queue(QueueName="notifications")["QueueUrl"]
    notes_arn = sqs.get_queue_attributes(QueueUrl=notes_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=notes_arn)

    settings = {
        "MODEL_BUCKET": BUCKET,
        "MODEL_NAME": "default",
        "PROMOTION_MODE": "auto",
        "PROMOTION_TOLERANCE": "0",
        "NOTIFICATION_TOPIC_ARN": topic_arn,
        "POWERTOOLS_SERVICE_NAME": "treeserve-refresh",
    }
    settings.update(env)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    handler = import_handler(REFRESH_DIR, "app.handler", fresh=True)
    module = sys.modules[handler.__module__]
    module.metrics.clear_metrics()
    stack = RefreshStack(s3, sqs, queue_url, queue_arn, notes_url, topic_arn, handler, module)
    # Configuring the notification made S3 send an s3:TestEvent; keep it apart from uploads.
    stack.test_events = stack.receive()
    return stack


# --- models and holdouts -------------------------------------------------------------------------


def holdout_rows(n: int = 300, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Fresh rows of the fixtures' data-generating process (not any model's training rows)."""
    X, signal = make_data(n, 6, seed)
    return X, (signal > 0).astype(float)


def holdout_csv_bytes(names: list[str], X: np.ndarray, y: np.ndarray) -> bytes:
    return csv_bytes([*names, "label"], [[*x, int(t)] for x, t in zip(X.tolist(), y, strict=True)])


def binary_booster(
    model: TrainedModel, *, rounds: int, shuffle_labels: bool = False, seed: int = 0
) -> TrainedModel:
    """A binary model on ``model``'s rows: weaker with few rounds, noise with shuffled labels."""
    y = np.random.default_rng(seed).permutation(model.y) if shuffle_labels else model.y
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "eta": 0.3, "nthread": 1, "seed": seed},
        xgb.DMatrix(model.X, label=y, feature_names=model.feature_names),
        num_boost_round=rounds,
    )
    return TrainedModel(booster, model.X, y, model.feature_names, model.objective)
