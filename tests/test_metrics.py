"""Prometheus metrics, scraped over HTTP from both servers and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tests.conftest import Stack, StackFactory
from tests.test_gateway import infer_request
from tiergate.constants import MODEL_NAME
from tiergate.envelope import Keyring, Sealer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    """Every sample of `GET /metrics`, keyed by sample name and label set."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert reply.status == 200
            return str(reply.read().decode("utf-8"))

    text = await asyncio.get_running_loop().run_in_executor(None, fetch)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def infer(stack: Stack, texts: list[str], **parameters: str) -> None:
    await stack.stub.ModelInfer(infer_request(texts, **parameters), timeout=10.0)


async def test_counters_follow_edge_answers_and_escalations(
    start_stack: StackFactory, tiny_rows: list[tuple[str, str]]
) -> None:
    stack = await start_stack()
    texts = [text for text, _ in tiny_rows[:3]]
    before = await scrape(stack.gateway.metrics_port)
    await infer(stack, texts, tier="edge")
    await infer(stack, texts[:1], tier="cloud")
    after = await scrape(stack.gateway.metrics_port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tiergate_rows_total", model=MODEL_NAME, tier="edge") == 3
    assert moved("tiergate_rows_total", model=MODEL_NAME, tier="cloud") == 1
    assert moved("tiergate_escalations_total", model=MODEL_NAME, reason="client_hint") == 1
    assert moved("tiergate_request_duration_seconds_count", model=MODEL_NAME, tier="edge") == 1
    assert moved("tiergate_request_duration_seconds_count", model=MODEL_NAME, tier="cloud") == 1
    assert moved("tiergate_edge_batch_rows_count", tier="edge") == 1, "the hinted row skipped the edge"
    assert moved("tiergate_degraded_responses_total", model=MODEL_NAME) == 0
    assert value(after, "tiergate_inflight_requests", model=MODEL_NAME) == 0
    # Three edge rows and one cloud row, against four cloud rows.
    spent = moved("tiergate_cost_spent_total", model=MODEL_NAME, currency="USD")
    cloud_only = moved("tiergate_cost_cloud_only_total", model=MODEL_NAME, currency="USD")
    assert spent == pytest.approx((3 * 0.002 + 1 * 0.40) / 1000)
    assert cloud_only == pytest.approx(4 * 0.40 / 1000)
    assert moved("tiergate_cost_saved_total", model=MODEL_NAME, currency="USD") == pytest.approx(3 * 0.398 / 1000)
    assert moved("tiergate_cost_overspent_total", model=MODEL_NAME, currency="USD") == 0
    info = [key for key in after if key[0] == "tiergate_model_info"]
    assert len(info) == 1 and ("chain", "edge,cloud") in info[0][1] and ("model", MODEL_NAME) in info[0][1]

    cloud = await scrape(stack.cloud.metrics_port)  # type: ignore[union-attr]
    assert value(cloud, "tiergate_cloud_rows_total", model=MODEL_NAME) == 1
    assert value(cloud, "tiergate_cloud_request_duration_seconds_count", model=MODEL_NAME) == 1


async def test_low_confidence_escalation_is_counted(
    start_stack: StackFactory, tiny_rows: list[tuple[str, str]]
) -> None:
    stack = await start_stack(threshold=1.0)
    await infer(stack, [text for text, _ in tiny_rows[:2]])
    after = await scrape(stack.gateway.metrics_port)
    assert value(after, "tiergate_escalations_total", model=MODEL_NAME, reason="low_confidence") == 2
    assert value(after, "tiergate_rows_total", model=MODEL_NAME, tier="cloud") == 2
    # Both rows ran on the edge first, then on the cloud: tiering cost more than cloud-only here.
    assert value(after, "tiergate_cost_spent_total", model=MODEL_NAME, currency="USD") > value(
        after, "tiergate_cost_cloud_only_total", model=MODEL_NAME, currency="USD"
    )
    assert value(after, "tiergate_cost_overspent_total", model=MODEL_NAME, currency="USD") == pytest.approx(
        2 * 0.002 / 1000
    )
    assert value(after, "tiergate_cost_saved_total", model=MODEL_NAME, currency="USD") == 0


async def test_degraded_answers_and_hop_errors_are_counted(start_stack: StackFactory) -> None:
    stack = await start_stack(with_cloud=False, cloud_target="127.0.0.1:1", threshold=1.0)
    await infer(stack, ["whole milk"])
    after = await scrape(stack.gateway.metrics_port)
    assert value(after, "tiergate_degraded_responses_total", model=MODEL_NAME) == 1
    assert value(after, "tiergate_hop_errors_total", tier="cloud", code="UNAVAILABLE") == 1
    assert value(after, "tiergate_escalations_total", model=MODEL_NAME, reason="tier_unavailable") == 1
    assert value(after, "tiergate_rows_total", model=MODEL_NAME, tier="edge") == 1


async def test_rejected_envelopes_are_counted_on_both_sides(start_stack: StackFactory, keyring_path: object) -> None:
    # The cloud opens the gateway's key but seals its answers with a key the gateway does not hold.
    shared = Keyring.load(keyring_path)  # type: ignore[arg-type]
    rogue = Keyring.generate("rogue")
    cloud_keys = Keyring(keys={**shared.keys, **rogue.keys}, active_key_id="rogue")
    stack = await start_stack(cloud_keyring=cloud_keys, threshold=1.0)
    await infer(stack, ["whole milk"])
    gateway = await scrape(stack.gateway.metrics_port)
    assert value(gateway, "tiergate_envelope_rejections_total", tier="cloud", cause="unknown_key_id") == 1
    assert value(gateway, "tiergate_degraded_responses_total", model=MODEL_NAME) == 1

    # A tampered request straight at the cloud: refused, counted by cause, and never reaches the model.
    envelope = Sealer(shared).seal(
        cloud_pb2.CloudInferRequest(model_name=MODEL_NAME, texts=["milk"]), request_id="r1", direction="request"
    )
    envelope.ciphertext = bytes([envelope.ciphertext[0] ^ 1]) + envelope.ciphertext[1:]
    assert stack.cloud is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.cloud.servicer.bound[1]}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await cloud_pb2_grpc.CloudInferenceStub(channel).Infer(envelope, timeout=5.0)
    assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
    cloud = await scrape(stack.cloud.metrics_port)
    assert value(cloud, "tiergate_cloud_envelope_rejections_total", cause="tampered") == 1
    assert value(cloud, "tiergate_cloud_rpc_errors_total", method="Infer", code="UNAUTHENTICATED") == 1
    assert value(cloud, "tiergate_cloud_rows_total", model=MODEL_NAME) == 1, "only the gateway's row was run"


async def test_refused_requests_are_counted_by_code(stack: Stack) -> None:
    bad = infer_request(["milk"])
    bad.inputs[0].datatype = "FP32"
    with pytest.raises(grpc.aio.AioRpcError):
        await stack.stub.ModelInfer(bad, timeout=5.0)
    after = await scrape(stack.gateway.metrics_port)
    assert value(after, "tiergate_rpc_errors_total", method="ModelInfer", code="INVALID_ARGUMENT") == 1


async def test_no_label_carries_request_text(start_stack: StackFactory) -> None:
    stack = await start_stack(threshold=1.0)
    await infer(stack, ["secret shopper query 12345"], tier="cloud")
    for port in (stack.gateway.metrics_port, stack.cloud.metrics_port):  # type: ignore[union-attr]
        samples = await scrape(port)
        assert not [key for key in samples if any("secret" in v for _, v in key[1])]
