"""The boundary policy: what of a row may leave the private side, as a pure function, in the cascade, on the wire."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.cascade import Cascade, TieredModel
from gateway.drift import DriftWatch
from gateway.metrics import GatewayMetrics
from gateway.policy import Action, BoundaryPolicy, Kind, gtin_valid, luhn_valid
from gateway.routing import Hint, Reason, RoutingPolicy
from tests.conftest import StackFactory
from tests.tap import TapProxy
from tests.test_gateway import infer_request, rows
from tests.test_routing import TableTier
from tiergate.constants import MODEL_NAME, REASONS_PARAMETER
from tiergate.settings import CloudSettings, DriftSettings, GatewaySettings, PolicySettings
from training.data import generate_demo_catalogue

EMAIL, PHONE = "jane.doe@example.com", "+1 415 555 0134"
PLANTED = f"organic milk for {EMAIL} call {PHONE}"
REDACTED = "organic milk for [EMAIL] call [PHONE]"


# --- the pure function -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "found"),
    [
        ("milk for jane.doe@example.com", Kind.EMAIL, "jane.doe@example.com"),
        ("ship to J.O'Neil+grocery@mail.example.co.uk today", Kind.EMAIL, "J.O'Neil+grocery@mail.example.co.uk"),
        ("eggs call +1 415 555 0134", Kind.PHONE, "+1 415 555 0134"),
        ("eggs call (415) 555-0134 after 6", Kind.PHONE, "(415) 555-0134"),
        ("bread 415.555.0134", Kind.PHONE, "415.555.0134"),
        ("bread 1-800-555-0199", Kind.PHONE, "1-800-555-0199"),
        ("rice 4155550134", Kind.PHONE, "4155550134"),
        ("tea +44 20 7946 0958", Kind.PHONE, "+44 20 7946 0958"),
        ("tea +44 (0)20 7946 0958", Kind.PHONE, "+44 (0)20 7946 0958"),
        ("tea 020 7946 0958", Kind.PHONE, "020 7946 0958"),
        ("tea (0161) 496 0000", Kind.PHONE, "(0161) 496 0000"),
        ("tea 07700 900123", Kind.PHONE, "07700 900123"),
        ("café +33 1 23 45 67 89", Kind.PHONE, "+33 1 23 45 67 89"),
        ("pay with 4111 1111 1111 1111", Kind.CARD, "4111 1111 1111 1111"),
        ("pay with 4111-1111-1111-1111 2 L", Kind.CARD, "4111-1111-1111-1111"),
        ("card 5555555555554444 thanks", Kind.CARD, "5555555555554444"),
        ("amex 3782 822463 10005", Kind.CARD, "3782 822463 10005"),
        ("deliver to 94107", Kind.POSTCODE, "94107"),
        ("pizza near 10025", Kind.POSTCODE, "10025"),
        ("San Francisco, CA 94107", Kind.POSTCODE, "94107"),
        ("zip: 94107-1234", Kind.POSTCODE, "94107-1234"),
        ("milk 94107-1234", Kind.POSTCODE, "94107-1234"),
        ("scones SW1A 1AA", Kind.POSTCODE, "SW1A 1AA"),
        ("scones sw1a 1aa", Kind.POSTCODE, "sw1a 1aa"),
        ("bagels M5V 3L9 toronto", Kind.POSTCODE, "M5V 3L9"),
        ("bagels k1a0b1", Kind.POSTCODE, "k1a0b1"),
    ],
)
def test_finds_each_kind(text: str, kind: Kind, found: str) -> None:
    (finding,) = BoundaryPolicy().find(text)
    assert (finding.kind, text[finding.start : finding.end]) == (kind, found)


@pytest.mark.parametrize(
    "text",
    [
        "Organic 2% Reduced Fat Milk, 1 gal",
        "Sparkling Water 2 L",
        "Greek Yogurt 12 oz",
        "Large Eggs 6 ct",
        "Olive Oil 500 ml",
        "2 in 1 Shampoo + Conditioner",
        "Cola 12 x 355 ml, Pack of 24 (12 fl oz cans)",
        "Vitamin B12 1000 mcg 120 ct",
        "Vitamin B12 1lb",
        "Power Bank 10000 mAh 2 Ports",
        "Speedwav 77489 Handlebar",
        "Svachh Steel Inner Lid Pressure Cooker (20257)",
        "Lunch Box/Tiffin Box - HMHTLB 73357-AV",
        "Lego Star Wars 75192",
        "Apple MD199HN/A",
        "Canon EOS 1300D 18-55 mm",
        "Pencil EAN 4006381333931",
        "Crackers UPC 012345678905",
        "Batteries 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
        "Tea 2+1 offer, 100 g",
        "Price 12345.50",
        "Gift card 4111 1111 1111 1112",  # fails the Luhn check
        "Crème brûlée, 2×120 g",
    ],
)
def test_grocery_names_and_sizes_are_not_flagged(text: str) -> None:
    assert BoundaryPolicy().find(text) == []


def test_demo_catalogue_has_no_false_positives() -> None:
    texts = generate_demo_catalogue(3000).texts
    flagged = [text for text in texts if BoundaryPolicy().find(text)]
    assert len(texts) == 3000
    assert flagged == []


def test_redact_replaces_each_match_with_its_placeholder() -> None:
    policy = BoundaryPolicy(Action.REDACT)
    text = "milk jane@example.com 4111 1111 1111 1111 (415) 555-0134 deliver to 94107, 2 L"
    assert policy.redact(text) == "milk [EMAIL] [CARD] [PHONE] deliver to [POSTCODE], 2 L"
    clean, planted = policy.apply(["Greek Yogurt 12 oz", PLANTED])
    assert (clean.outbound, clean.findings, clean.private) == ("Greek Yogurt 12 oz", (), False)
    assert (planted.outbound, planted.private) == (REDACTED, False)
    assert [finding.kind for finding in planted.findings] == [Kind.EMAIL, Kind.PHONE]


def test_keep_private_holds_back_rows_with_personal_data_only() -> None:
    clean, planted = BoundaryPolicy(Action.KEEP_PRIVATE).apply(["Greek Yogurt 12 oz", PLANTED])
    assert (clean.outbound, clean.private) == ("Greek Yogurt 12 oz", False)
    assert (planted.outbound, planted.private) == (None, True)
    assert [finding.kind for finding in planted.findings] == [Kind.EMAIL, Kind.PHONE]


def test_only_the_configured_kinds_are_acted_on() -> None:
    emails_only = BoundaryPolicy(kinds=[Kind.EMAIL])
    assert emails_only.redact(PLANTED) == f"organic milk for [EMAIL] call {PHONE}"
    # A disabled kind is not half-matched as another: a card number is not redacted as a phone number.
    phones_only = BoundaryPolicy(kinds=[Kind.PHONE])
    assert phones_only.redact("pay 4111 1111 1111 1111") == "pay 4111 1111 1111 1111"
    assert BoundaryPolicy(kinds=[]).apply([PLANTED])[0].outbound == PLANTED


def test_from_settings_reads_and_validates() -> None:
    policy = BoundaryPolicy.from_settings(PolicySettings())
    assert (policy.action, policy.kinds, policy.forward_parameters) == (Action.REDACT, frozenset(Kind), frozenset())
    private = BoundaryPolicy.from_settings(PolicySettings(action="keep_private", kinds=["email"]))
    assert (private.action, private.kinds) == (Action.KEEP_PRIVATE, frozenset({Kind.EMAIL}))
    with pytest.raises(ValueError, match=r"policy.action must be one of redact, keep_private; got 'drop'"):
        BoundaryPolicy.from_settings(PolicySettings(action="drop"))
    with pytest.raises(ValueError, match=r"policy.kinds has unknown kinds \['iban'\]; known kinds: email, phone"):
        BoundaryPolicy.from_settings(PolicySettings(kinds=["email", "iban"]))


def test_no_request_parameter_is_forwardable_unless_listed() -> None:
    parameters = {"tier": "cloud", "user_id": "u-123", "locale": "en-GB"}
    assert BoundaryPolicy().forwardable(parameters) == {}
    assert BoundaryPolicy(forward_parameters=["locale"]).forwardable(parameters) == {"locale": "en-GB"}


def test_check_digits() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")
    assert gtin_valid("4006381333931") and not gtin_valid("4006381333932")


# --- in the cascade (plain objects) ------------------------------------------------------------------------

ROUTING = RoutingPolicy(threshold=0.5, max_edge_tokens=12, max_edge_batch=8)
UNSURE = f"odd thing for {EMAIL}"
SURE = f"milk for {EMAIL}"
EDGE = {"milk": ("dairy", 0.9), "odd thing": ("pantry", 0.2), SURE: ("dairy", 0.9), UNSURE: ("pantry", 0.2)}
CLOUD = {
    "milk": ("dairy", 0.99),
    "odd thing": ("frozen", 0.8),
    "milk for [EMAIL]": ("dairy", 0.99),
    "odd thing for [EMAIL]": ("frozen", 0.8),
}


def _traced() -> tuple[InMemorySpanExporter, TracerProvider]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider


async def test_cascade_sends_remote_tiers_redacted_text_only() -> None:
    edge, cloud = TableTier("edge", EDGE), TableTier("cloud", CLOUD)
    cascade = Cascade([edge, cloud], ROUTING, data_policy=BoundaryPolicy(Action.REDACT))
    result = await cascade.infer(["milk", UNSURE, SURE], Hint.AUTO)
    assert [(r.label, r.tier, r.reasons) for r in result.rows] == [
        ("dairy", "edge", ()),
        ("frozen", "cloud", (Reason.LOW_CONFIDENCE,)),
        ("dairy", "edge", ()),
    ]
    # The first tier is on the private side and sees the row as typed; the remote tier sees it redacted.
    assert edge.calls == [["milk", UNSURE, SURE]]
    assert cloud.calls == [["odd thing for [EMAIL]"]]
    assert tuple(result.outbound) == ("milk", "odd thing for [EMAIL]", "milk for [EMAIL]")


async def test_cascade_without_a_data_policy_redacts_by_default() -> None:
    edge, cloud = TableTier("edge", EDGE), TableTier("cloud", CLOUD)
    await Cascade([edge, cloud], ROUTING).infer([SURE], Hint.CLOUD)
    assert cloud.calls == [["milk for [EMAIL]"]]


@pytest.mark.parametrize("hint", [Hint.AUTO, Hint.CLOUD])
async def test_keep_private_rows_are_answered_by_the_first_tier(hint: Hint) -> None:
    edge, cloud = TableTier("edge", EDGE), TableTier("cloud", CLOUD)
    exporter, provider = _traced()
    cascade = Cascade(
        [edge, cloud], ROUTING, provider.get_tracer("test"), data_policy=BoundaryPolicy(Action.KEEP_PRIVATE)
    )
    model = TieredModel("m", "1", cascade, metrics=GatewayMetrics())
    result = await model.infer(["odd thing", UNSURE, SURE], hint)
    # Every row gets exactly one answer; no row holding personal data reaches the remote tier.
    answered = [(r.label, r.tier, r.reasons, r.ran) for r in result.rows]
    assert len(answered) == 3
    assert all("@" not in text for call in cloud.calls for text in call)
    if hint is Hint.AUTO:
        assert answered == [
            ("frozen", "cloud", (Reason.LOW_CONFIDENCE,), ("edge", "cloud")),
            ("pantry", "edge", (Reason.LOW_CONFIDENCE, Reason.PRIVATE_DATA), ("edge",)),
            ("dairy", "edge", (), ("edge",)),  # confident: it never wanted to leave
        ]
        assert cloud.calls == [["odd thing"]]
    else:
        # Heavy (client hint) rows skip the first tier, unless they are private: then it answers them.
        assert answered == [
            ("frozen", "cloud", (Reason.CLIENT_HINT,), ("cloud",)),
            ("pantry", "edge", (Reason.CLIENT_HINT, Reason.PRIVATE_DATA), ("edge",)),
            ("dairy", "edge", (Reason.CLIENT_HINT, Reason.PRIVATE_DATA), ("edge",)),
        ]
        assert edge.calls == [[UNSURE, SURE]]
        assert cloud.calls == [["odd thing"]]
    assert tuple(result.outbound) == ("odd thing", None, None)
    private_rows = 1 if hint is Hint.AUTO else 2
    assert result.reason_counts()["private_data"] == private_rows
    sample = model.metrics.registry.get_sample_value(
        "tiergate_escalations_total", {"model": "m", "reason": "private_data"}
    )
    assert sample == private_rows
    (route,) = [span for span in exporter.get_finished_spans() if span.name == "tiergate.route"]
    assert route.attributes is not None
    assert route.attributes["tiergate.routing.escalated_rows"] == 1
    assert route.attributes["tiergate.routing.private_rows"] == (1 if hint is Hint.AUTO else 0)
    # Heavy private rows are kept back before routing starts; unsure ones at the route to the remote tier.
    expected = "low_confidence=1,private_data=1" if hint is Hint.AUTO else "client_hint=1"
    assert route.attributes["tiergate.routing.reasons"] == expected


async def test_private_heavy_rows_are_answered_when_the_remote_tier_is_down() -> None:
    edge, cloud = TableTier("edge", EDGE), TableTier("cloud", CLOUD, fail=True)
    cascade = Cascade([edge, cloud], ROUTING, data_policy=BoundaryPolicy(Action.KEEP_PRIVATE))
    result = await cascade.infer(["odd thing", SURE], Hint.CLOUD)
    assert [(r.tier, r.reasons) for r in result.rows] == [
        ("edge", (Reason.CLIENT_HINT, Reason.TIER_UNAVAILABLE)),
        ("edge", (Reason.CLIENT_HINT, Reason.PRIVATE_DATA)),
    ]
    assert cloud.calls == [["odd thing"]]


@pytest.mark.parametrize(
    ("action", "shadowed"), [(Action.REDACT, ["milk", "milk for [EMAIL]"]), (Action.KEEP_PRIVATE, ["milk"])]
)
async def test_drift_watch_is_offered_only_what_may_leave(action: Action, shadowed: list[str]) -> None:
    # The drift watch shadows confident edge rows to the remote tier, so it too stays behind the boundary.
    edge, cloud = TableTier("edge", EDGE), TableTier("cloud", CLOUD)
    metrics = GatewayMetrics()
    drift = DriftWatch(DriftSettings(sample_rate=1.0), cloud, model="m", model_version="1", metrics=metrics, seed=0)
    cascade = Cascade([edge, cloud], ROUTING, data_policy=BoundaryPolicy(action))
    model = TieredModel("m", "1", cascade, metrics=metrics, drift=drift)
    drift.start()
    try:
        await model.infer(["milk", SURE])
        await drift.drained()
    finally:
        await drift.stop()
    assert [text for call in cloud.calls for text in call] == shadowed


# --- on real servers, with a tap on the hop -----------------------------------------------------------------


def _record_cloud_inputs(monkeypatch: pytest.MonkeyPatch, model: Any) -> list[list[str]]:
    """What the cloud model is asked after it opened the envelope: exactly what left the gateway."""
    seen: list[list[str]] = []
    predict: Callable[[Sequence[str]], Any] = model.predict

    def recording(texts: Sequence[str]) -> Any:
        seen.append(list(texts))
        return predict(texts)

    monkeypatch.setattr(model, "predict", recording)
    return seen


SECRETS = (PLANTED.encode(), EMAIL.encode(), b"jane.doe", b"example.com", PHONE.encode(), b"555 0134")


@pytest.mark.parametrize(
    ("action", "threshold", "hint", "expected"),
    [
        ("redact", None, "cloud", [("cloud", "client_hint"), ("cloud", "client_hint")]),
        ("redact", 1.0, "auto", [("cloud", "low_confidence"), ("cloud", "low_confidence")]),
        ("keep_private", None, "cloud", [("edge", "client_hint+private_data"), ("cloud", "client_hint")]),
        ("keep_private", 1.0, "auto", [("edge", "low_confidence+private_data"), ("cloud", "low_confidence")]),
    ],
)
async def test_personal_data_never_crosses_the_hop(
    start_stack: StackFactory,
    tiny_rows: list[tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    action: str,
    threshold: float | None,
    hint: str,
    expected: list[tuple[str, str]],
) -> None:
    clean = tiny_rows[0][0]  # a row the tiny edge model is unsure of at threshold 1.0 (as test_tracing relies on)
    backend = await start_stack()
    assert backend.cloud is not None
    cloud_inputs = _record_cloud_inputs(monkeypatch, backend.cloud.servicer.model)
    tap = TapProxy(backend.cloud.managed.port)
    tap_port = await tap.start()

    def with_policy(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.policy = PolicySettings(action=action)

    try:
        tapped = await start_stack(
            with_cloud=False, cloud_target=f"127.0.0.1:{tap_port}", threshold=threshold, configure=with_policy
        )
        reply = await tapped.stub.ModelInfer(infer_request([PLANTED, clean], tier=hint))
        labels = {"model": MODEL_NAME, "reason": "private_data"}
        private_count = tapped.gateway.metrics.registry.get_sample_value("tiergate_escalations_total", labels)
    finally:
        # Both stacks first (the tapped gateway before the cloud behind the tap), then the tap.
        await start_stack.stop_all()
        await tap.close()
    answered = [(tier, why) for _, _, tier, why in rows(reply)]
    assert answered == expected
    assert json.loads(reply.parameters[REASONS_PARAMETER].string_param) == [why for _, why in expected]
    assert private_count == (1 if action == "keep_private" else None)
    # At the sealing boundary: what the cloud opened is the redacted row, or nothing of it at all.
    sent = [text for call in cloud_inputs for text in call]
    assert sent == ([REDACTED, clean] if action == "redact" else [clean])
    # On the wire: neither the row nor its personal data, though the envelope did cross.
    assert b"test-key" in tap.to_upstream
    assert not [secret for secret in SECRETS if secret in tap.to_upstream]


class _CountingPolicy(BoundaryPolicy):
    """The real policy, counting the rows it is asked to decide."""

    def __init__(self) -> None:
        super().__init__(Action.KEEP_PRIVATE)
        self.decided: list[str] = []

    def decide(self, text: str) -> Any:
        self.decided.append(text)
        return super().decide(text)


async def test_only_rows_that_may_leave_are_examined() -> None:
    # Rows the first tier settles never go near the boundary, so the policy never reads them; an unsure row,
    # and a heavy one bound for the last tier, are examined before anything is sent.
    policy = _CountingPolicy()
    edge, cloud = TableTier("edge", EDGE), TableTier("cloud", CLOUD)
    cascade = Cascade([edge, cloud], ROUTING, data_policy=policy)
    result = await cascade.infer(["milk", SURE, UNSURE], Hint.AUTO)
    assert policy.decided == [UNSURE]
    assert [row.reasons for row in result.rows] == [(), (), (Reason.LOW_CONFIDENCE, Reason.PRIVATE_DATA)]
    assert cloud.calls == []
    # What may leave is still known for every row, decided on first use.
    assert list(result.outbound) == ["milk", None, None] and policy.decided == [UNSURE, "milk", SURE]
    policy.decided.clear()
    await cascade.infer(["milk"], Hint.CLOUD)
    assert policy.decided == ["milk"] and cloud.calls == [["milk"]]


@pytest.mark.parametrize(
    "text",
    ["Greek Yogurt", "Greek Yogurt 12 oz", PLANTED, "café olé", "SW1A 1AA", "mail me at a@b.co", "no digits here"],
)
def test_deciding_one_row_matches_a_full_search(text: str) -> None:
    # The quick look for a digit or an "@" skips only texts the full search finds nothing in.
    for action in Action:
        policy = BoundaryPolicy(action)
        decision = policy.decide(text)
        assert decision.findings == tuple(policy.find(text))
        assert policy.apply([text]) == [decision]
