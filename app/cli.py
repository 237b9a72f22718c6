"""The `tiergate` command line: build, calibrate and evaluate models; serve either tier; run the demo and bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from tiergate.logs import LOG_FORMAT_ENV, LOG_FORMATS, LOG_LEVEL_ENV, configure_logging
from tiergate.settings import (
    DEFAULT_KEYRING,
    DEFAULT_MODELS_DIR,
    CloudSettings,
    GatewaySettings,
    Settings,
    load_settings,
)

# Commands whose own output tells the story: below WARNING, library and training logs would drown it.
_QUIET_COMMANDS = frozenset({"demo", "bench"})


def resolve_log_level(args: argparse.Namespace) -> str:
    """The flag, else TIERGATE_LOG_LEVEL, else WARNING for the demo and bench and INFO for the rest."""
    if args.log_level is not None:
        return str(args.log_level)
    return os.environ.get(LOG_LEVEL_ENV) or ("warning" if args.command in _QUIET_COMMANDS else "info")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _write_ports(port_file: Path | None, port: int, metrics_port: int) -> None:
    """`{"port": ..., "metrics_port": ...}` (0: no metrics endpoint), for whoever started the server."""
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": port, "metrics_port": metrics_port}), encoding="utf-8")
        tmp.replace(port_file)  # atomic: a reader never sees a half-written file


def _apply_server_flags(section: GatewaySettings | CloudSettings, args: argparse.Namespace) -> None:
    """Command-line flags override the settings file and environment."""
    for flag, attribute in (("host", "host"), ("port", "port"), ("models", "models_dir"), ("keyring", "keyring_path")):
        value = getattr(args, flag)
        if value is not None:
            setattr(section, attribute, value)
    if args.metrics_port is not None:
        section.metrics.port = args.metrics_port


async def _serve_gateway(args: argparse.Namespace) -> None:
    from gateway.server import GatewayServer
    from tiergate.envelope import Keyring

    settings = _settings(args).gateway
    _apply_server_flags(settings, args)
    if args.cloud is not None:
        settings.cloud_target = args.cloud
    if args.edge_only:
        settings.chain = ["edge"]
    keyring = Keyring.load_or_create(settings.keyring_path) if "cloud" in settings.chain else None
    server = GatewayServer(settings, keyring)
    port = await server.start()
    _write_ports(args.port_file, port, server.metrics_port)
    await server.serve_forever()


async def _serve_cloud(args: argparse.Namespace) -> None:
    from cloud_runtime.server import CloudServer
    from tiergate.envelope import Keyring

    settings = _settings(args).cloud
    _apply_server_flags(settings, args)
    server = CloudServer(settings, Keyring.load_or_create(settings.keyring_path))
    port = await server.start()
    _write_ports(args.port_file, port, server.metrics_port)
    await server.serve_forever()


def _models_alternatives(args: argparse.Namespace) -> int:
    import tempfile

    from training.edge_alternatives import truncated_minilm_alternative

    with tempfile.TemporaryDirectory() as work:
        result = truncated_minilm_alternative(
            args.models, args.data, Path(work), layers=args.layers, epochs=args.epochs
        )
    print(json.dumps(result, indent=2))
    return 0


def _models_build(args: argparse.Namespace) -> int:
    from training.build import build_models

    manifest = build_models(args.out, data_dir=args.data, task=args.task, seed=args.seed)
    print(f"built model set {manifest.version} in {args.out}")
    print(f"threshold {manifest.routing.threshold:.4f} on signal {manifest.routing.signal}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from training.calibrate import calibrate, calibrate_from_feedback

    if args.feedback is not None:
        if args.target_quality is None or args.target_escalation is not None:
            print("--feedback takes --target-quality (agreement with the cloud on live traffic)", file=sys.stderr)
            return 2
        routing = calibrate_from_feedback(args.models, args.feedback, args.target_quality)
        print(f"threshold {routing.threshold:.4f} on signal {routing.signal}: {routing.calibration}")
        return 0
    if (args.target_escalation is None) == (args.target_quality is None):
        print("give exactly one of --target-escalation or --target-quality", file=sys.stderr)
        return 2
    routing = calibrate(
        args.models, args.data, target_escalation=args.target_escalation, target_quality=args.target_quality
    )
    print(f"threshold {routing.threshold:.4f} on signal {routing.signal}: {routing.calibration}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    report = evaluate(args.models, args.data, args.out, bigbasket_dir=args.bigbasket)
    print(f"wrote {args.out}/report.md, report.json, report.png")
    summary = report.get("summary") if isinstance(report, dict) else None
    if summary:
        print(summary)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from app.demo import DemoOptions, run_demo

    options = DemoOptions(
        models_dir=args.models,
        data_dir=args.data,
        keyring_path=args.keyring,
        requests=args.requests,
        concurrency=args.concurrency,
        log_format=args.log_format,
    )
    return run_demo(options)


def _bench(args: argparse.Namespace) -> int:
    from app.bench import run_bench

    return run_bench(args.models, args.data, args.keyring, requests=args.requests, calls=args.calls)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiergate", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=None,
        help=f"default from {LOG_LEVEL_ENV}, else warning for demo and bench (their own lines tell the story), "
        "else info",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get(LOG_FORMAT_ENV) or "plain",
        help=f"plain lines, or one JSON object per line (default from {LOG_FORMAT_ENV}, else plain)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="build model sets").add_subparsers(dest="action", required=True)
    build = models.add_parser("build", help="train, export, quantize and calibrate the edge and cloud models")
    build.add_argument(
        "--data", type=Path, default=None, help="instacart-products directory (default: generated demo data)"
    )
    build.add_argument("--out", type=Path, default=DEFAULT_MODELS_DIR, help="model directory to write")
    build.add_argument("--task", choices=["aisle", "department"], default="aisle")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(handler=_models_build)
    alt = models.add_parser(
        "alternatives", help="distil and measure a truncated-MiniLM edge against a built set; record it in the manifest"
    )
    alt.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    alt.add_argument("--data", type=Path, default=None, help="the data the models were built from")
    alt.add_argument("--layers", type=int, default=2, help="MiniLM layers the student keeps")
    alt.add_argument("--epochs", type=int, default=1)
    alt.set_defaults(handler=_models_alternatives)

    cal = commands.add_parser("calibrate", help="pick the escalation threshold on validation data")
    cal.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    cal.add_argument("--data", type=Path, default=None, help="the data the models were built from")
    cal.add_argument("--target-escalation", type=float, default=None, help="share of rows to escalate, e.g. 0.15")
    cal.add_argument("--target-quality", type=float, default=None, help="cascade accuracy relative to cloud, e.g. 0.99")
    cal.add_argument(
        "--feedback",
        type=Path,
        default=None,
        help="re-pick the threshold on live traffic: the gateway's drift record (drift.record_path, with "
        "drift.record_agreeing), with --target-quality",
    )
    cal.set_defaults(handler=_calibrate)

    ev = commands.add_parser("eval", help="write the evaluation report (JSON, Markdown, PNG)")
    ev.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    ev.add_argument("--data", type=Path, default=None)
    ev.add_argument("--bigbasket", type=Path, default=None, help="bigbasket-products directory for the shift check")
    ev.add_argument("--out", type=Path, default=Path("reports"))
    ev.set_defaults(handler=_eval)

    serve = commands.add_parser("serve", help="run a server").add_subparsers(dest="server", required=True)
    for name, runner, port_help in (
        ("gateway", _serve_gateway, "OIP port (default from settings: 8001; 0 picks a free port)"),
        ("cloud", _serve_cloud, "cloud tier port (default from settings: 8101; 0 picks a free port)"),
    ):
        sub = serve.add_parser(name, help=f"serve the {name}")
        sub.add_argument("--config", type=Path, default=None, help="TOML settings file (TIERGATE_* env overrides it)")
        sub.add_argument("--host", default=None)
        sub.add_argument("--port", type=int, default=None, help=port_help)
        sub.add_argument("--models", type=Path, default=None, help=f"model directory (default {DEFAULT_MODELS_DIR})")
        sub.add_argument("--keyring", type=Path, default=None, help=f"sealing keyring (default {DEFAULT_KEYRING})")
        sub.add_argument("--port-file", type=Path, default=None, help="write the bound ports here (JSON) once serving")
        sub.add_argument(
            "--metrics-port", type=int, default=None, help="Prometheus /metrics port (0 picks a free port)"
        )
        if name == "gateway":
            sub.add_argument("--cloud", default=None, help="cloud tier HOST:PORT")
            sub.add_argument("--edge-only", action="store_true", help="serve with the edge tier alone")
        sub.set_defaults(handler=lambda a, r=runner: asyncio.run(r(a)) or 0)

    demo = commands.add_parser("demo", help="build models if missing, start cloud + gateway, send traffic, summarise")
    demo.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    demo.add_argument("--data", type=Path, default=None, help="instacart-products directory (default: demo data)")
    demo.add_argument("--keyring", type=Path, default=DEFAULT_KEYRING)
    demo.add_argument("--requests", type=int, default=3000)
    demo.add_argument("--concurrency", type=int, default=8)
    demo.set_defaults(handler=_demo)

    bench = commands.add_parser(
        "bench", help="edge INT8/FP32 vs cloud latency and size, then per-tier latency end to end"
    )
    bench.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    bench.add_argument("--data", type=Path, default=None)
    bench.add_argument("--keyring", type=Path, default=DEFAULT_KEYRING)
    bench.add_argument("--requests", type=int, default=2000, help="end-to-end requests")
    bench.add_argument("--calls", type=int, default=1000, help="timed batch-1 calls per model")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(resolve_log_level(args), args.log_format)
    except ValueError as error:  # an unknown level, or a format from the environment argparse did not check
        parser.error(str(error))
    try:
        if args.command == "serve":  # servers draw no progress bars: their records go straight to the handler
            return int(args.handler(args))
        # The other commands may train: log lines are then written above the progress bars, not through them.
        with logging_redirect_tqdm():
            return int(args.handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
