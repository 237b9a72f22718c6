"""The grey-band hedging section of `make bench`: what hedging saves grey rows on a cloud with a slow tail.

The edge and cloud are real (the in-process INT8 edge tier, and the sealed mutual-TLS hop to a cloud server in its
own process). The distance to a public cloud is modelled: each hop call waits a drawn extra delay first, usually
short, sometimes long (`WAN_DELAYS_S`), the same draws for both setups. Each timed request is one grey-band row;
the setups alternate request by request, so machine noise falls on both alike.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.cascade import Cascade, ChainRules, routing_signal
from gateway.server import build_tiers, routing_policy
from gateway.tier import Prediction, Tier
from tiergate.envelope import Sealer
from tiergate.inputs import Row
from tiergate.keys import apply_key_dir, load_keyring
from tiergate.manifest import load_manifest
from tiergate.settings import GatewaySettings
from tiergate.telemetry import Tracing
from training.measure import percentile

# The modelled extra hop delay: (seconds, probability). A near region, with one call in ten slow.
WAN_DELAYS_S = ((0.010, 0.9), (0.150, 0.1))
# The hedge wait compared, and the share of escalating rows (the highest signals) that make the grey band.
HEDGE_WAIT_S = 0.04
GREY_SHARE = 0.3
SEED = 7


class NotMeasured(Exception):
    """The held-out set gives this section nothing to measure (a tiny model set)."""


class WanDelay:
    """A tier that waits the next scripted delay, then calls the real remote tier behind it."""

    def __init__(self, inner: Tier, delays: Sequence[float]) -> None:
        self.name = inner.name
        self._inner = inner
        self._delays = list(delays)
        self._next = 0

    def draw(self, index: int) -> None:
        """The next call waits delay `index` of the script (both setups replay the same draws)."""
        self._next = index

    async def predict(self, texts: Sequence[Row], deadline: float | None) -> list[Prediction]:
        await asyncio.sleep(self._delays[self._next % len(self._delays)])
        return await self._inner.predict(texts, deadline)

    def ready(self) -> bool:
        return self._inner.ready()

    def expected_latency_s(self) -> float | None:
        return None  # the deadline rule is not what this section measures

    def start(self) -> None:
        self._inner.start()

    async def close(self) -> None:
        await self._inner.close()


@dataclass
class HedgeRun:
    """Per setup: each request's latency (ms), and which grey rows kept the edge's answer and were right."""

    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: {"off": [], "on": []})
    kept_edge: dict[str, int] = field(default_factory=lambda: {"off": 0, "on": 0})
    correct: dict[str, int] = field(default_factory=lambda: {"off": 0, "on": 0})


async def _run(
    models_dir: Path, keys_dir: Path, cloud_target: str, rows: Sequence[tuple[str, str]], requests: int
) -> tuple[HedgeRun, float, float, int]:
    settings = GatewaySettings(models_dir=models_dir, keys_dir=keys_dir, cloud_target=cloud_target)
    apply_key_dir(settings)
    manifest = load_manifest(models_dir)
    sealer = Sealer(load_keyring(settings.keyring_path))
    settings.tracing.enabled = False
    tracing = Tracing.from_settings(settings.tracing, "tiergate-bench")
    edge, cloud = build_tiers(settings, manifest, sealer, tracing)
    policy = routing_policy(settings, manifest)
    rng = random.Random(SEED)
    delays = [rng.choices([d for d, _ in WAN_DELAYS_S], [p for _, p in WAN_DELAYS_S])[0] for _ in range(requests)]
    slow = WanDelay(cloud, delays)
    slow.start()
    try:
        # The grey band: the highest-signal share of the rows the edge escalates.
        answers = await edge.predict([text for text, _ in rows], None)
        signals = np.array([routing_signal(answer) for answer in answers])
        escalating = signals < policy.threshold
        if not escalating.any():
            raise NotMeasured("the edge escalates none of the held-out rows: there is no grey band")
        floor = float(np.quantile(signals[escalating], 1.0 - GREY_SHARE))
        band = policy.threshold - floor
        grey = [row for row, signal in zip(rows, signals, strict=True) if floor <= signal < policy.threshold]
        cascades = {
            "off": Cascade([edge, slow], policy),
            "on": Cascade([edge, slow], policy, rules=ChainRules(hedge_band=band, hedge_wait_s=HEDGE_WAIT_S)),
        }
        run = HedgeRun()
        loop = asyncio.get_running_loop()
        for warm in grey[:10]:
            slow.draw(0)
            await cascades["off"].infer([warm[0]])
        for index in range(requests):
            text, label = grey[index % len(grey)]
            for setup in ("off", "on") if index % 2 == 0 else ("on", "off"):
                slow.draw(index)
                started = loop.time()
                result = await cascades[setup].infer([text])
                run.latencies_ms[setup].append((loop.time() - started) * 1000.0)
                run.kept_edge[setup] += result.rows[0].tier == edge.name
                run.correct[setup] += result.rows[0].label == label
            await asyncio.sleep(0.02)  # let a cancelled hedge call finish unwinding on both sides
        return run, band, policy.threshold, len(grey)
    finally:
        await slow.close()
        await edge.close()
        tracing.shutdown()


def hedging_lines(run: HedgeRun, band: float, threshold: float, grey_rows: int, requests: int) -> list[str]:
    lines = [
        f"{'hedging':<9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'kept edge':>11}{'accuracy':>10}",
    ]
    for setup in ("off", "on"):
        latencies = run.latencies_ms[setup]
        lines.append(
            f"{setup:<9}{percentile(latencies, 0.5):>9.1f}{percentile(latencies, 0.9):>9.1f}"
            f"{percentile(latencies, 0.99):>9.1f}{float(np.mean(latencies)):>9.1f}"
            f"{run.kept_edge[setup] / requests:>11.1%}{run.correct[setup] / requests:>10.3f}"
        )
    off, on = run.latencies_ms["off"], run.latencies_ms["on"]
    lines.append(
        f"ratio on/off: p50 {percentile(on, 0.5) / percentile(off, 0.5):.2f}x, "
        f"p99 {percentile(on, 0.99) / percentile(off, 0.99):.2f}x, mean {np.mean(on) / np.mean(off):.2f}x "
        f"(band {band:.4g} under threshold {threshold:.4g}: {grey_rows} grey held-out rows)"
    )
    return lines


def bench_hedging(
    models_dir: Path, keys_dir: Path, cloud_target: str, rows: Sequence[tuple[str, str]], requests: int
) -> bool:
    """Grey-row latency and accuracy with hedging off and on, side by side (a held-out set without escalating
    rows is reported, not failed on)."""
    delays = ", ".join(f"{p:.0%} +{d * 1000:.0f} ms" for d, p in WAN_DELAYS_S)
    print(
        f"grey-band hedging: {requests} single-row requests per setup, each a held-out row in the grey band "
        f"(the top {GREY_SHARE:.0%} by signal of the rows the edge escalates), setups alternating; real INT8 edge "
        f"in process, real cloud server over the sealed mutual-TLS hop, plus a modelled WAN delay per hop call "
        f"({delays}; the same draws for both setups); hedge wait {HEDGE_WAIT_S * 1000:.0f} ms"
    )
    try:
        run, band, threshold, grey_rows = asyncio.run(_run(models_dir, keys_dir, cloud_target, rows, requests))
    except NotMeasured as error:
        print(f"grey-band hedging: not measured: {error}")
        return True
    for line in hedging_lines(run, band, threshold, grey_rows, requests):
        print(line)
    return True
