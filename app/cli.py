"""The `tiergate` command line: build, calibrate and evaluate models; serve either tier; run the demo and bench."""

from __future__ import annotations

import argparse
import asyncio
import gc
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

# `make run` and `make bench` make their own key directory here; `serve` never creates keys.
DEMO_KEYS = Path("artifacts/keys/demo")

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


def _key_error(error: Exception) -> int:
    """A key or token file problem: one line on stderr saying what to do, no traceback."""
    print(f"tiergate: error: {error}", file=sys.stderr)
    return 2


def _settle_heap() -> None:
    """Once the models are loaded: collect, then freeze what survived, so the cycle collector never walks the
    long-lived start-up objects again. A full collection over them pauses the event loop for tens to hundreds
    of milliseconds, which a caller's deadline would pay for."""
    gc.collect()
    gc.freeze()


async def _serve_gateway(args: argparse.Namespace) -> int:
    from tiergate.keys import KeyDirError, apply_key_dir, load_keyring

    settings = _settings(args).gateway
    _apply_server_flags(settings, args)
    if args.cloud is not None:
        settings.cloud_target = args.cloud
    if args.edge_only:
        settings.chain = ["edge"]
    if args.keys is not None:
        settings.keys_dir = args.keys
    # Keys are checked before the server (and its model runtime) is even imported: a missing keyring
    # fails in a moment, and is never created here (`tiergate keys init` does that).
    try:
        apply_key_dir(settings)
        if settings.chain != ["edge"]:  # a remote tier seals with the keyring
            load_keyring(settings.keyring_path)  # checked here; the server reads it again, and watches it
    except KeyDirError as error:
        return _key_error(error)

    from gateway.server import GatewayServer

    try:
        server = GatewayServer(settings)
    except ValueError as error:  # settings that cannot work together: say which, no traceback
        return _key_error(error)
    port = await server.start()
    _settle_heap()
    _write_ports(args.port_file, port, server.metrics_port)
    await server.serve_forever()
    return 0


async def _serve_cloud(args: argparse.Namespace) -> int:
    from tiergate.keys import KeyDirError, apply_key_dir, load_keyring

    settings = _settings(args).cloud
    _apply_server_flags(settings, args)
    if args.upstream is not None:
        settings.upstream = args.upstream
    if args.keys is not None:
        settings.keys_dir = args.keys
    try:
        apply_key_dir(settings)
        load_keyring(settings.keyring_path)  # checked here; the server reads it again, and watches it
    except KeyDirError as error:
        return _key_error(error)

    from cloud_runtime.server import CloudServer

    try:
        server = CloudServer(settings)
    except ValueError as error:
        return _key_error(error)
    port = await server.start()
    _settle_heap()
    _write_ports(args.port_file, port, server.metrics_port)
    await server.serve_forever()
    return 0


def _keys_init(args: argparse.Namespace) -> int:
    from tiergate.keys import KeyDirError, init_key_dir

    try:
        directory = init_key_dir(
            args.dir, cloud_names=args.cloud_name, gateway_names=args.gateway_name, days=args.days, force=args.force
        )
    except KeyDirError as error:
        return _key_error(error)
    print(f"wrote key directory {directory}: keyring, development CA, cloud and gateway certificates, token file")
    print(f"serve with: tiergate serve cloud --keys {directory}  /  tiergate serve gateway --keys {directory}")
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    from tiergate.keys import KeyDirError, activate_key, rotate_keyring

    try:
        if args.activate is not None:
            key_id = activate_key(args.dir, args.activate or None)
            print(f"key {key_id} now seals; envelopes sealed with the older keys still open")
        elif args.stage:
            key_id = rotate_keyring(args.dir, stage=True)
            print(f"added key {key_id} (not sealing yet): once both tiers have loaded it, run")
            print(f"  tiergate keys rotate {args.dir} --activate {key_id}")
        else:
            key_id = rotate_keyring(args.dir)
            print(f"added key {key_id}, which now seals; envelopes sealed with the older keys still open")
    except KeyDirError as error:
        return _key_error(error)
    return 0


def _keys_client_cert(args: argparse.Namespace) -> int:
    from tiergate.keys import KeyDirError, mint_client_cert

    try:
        cert, key = mint_client_cert(args.dir, args.name, days=args.days, force=args.force)
    except KeyDirError as error:
        return _key_error(error)
    print(f"wrote {cert} and {key} (subject CN {args.name})")
    return 0


def _token_file(args: argparse.Namespace) -> Path:
    from tiergate.keys import TOKENS_FILE

    return Path(args.file) if args.file is not None else Path(args.keys) / TOKENS_FILE


def _tokens_add(args: argparse.Namespace) -> int:
    from tiergate import tokens

    path = _token_file(args)
    try:
        token = tokens.add(path, args.name, args.models.split(","))
    except tokens.TokenFileError as error:
        return _key_error(error)
    # The token alone on stdout, so `TOKEN=$(tiergate tokens add ...)` captures exactly it; it is stored nowhere.
    print(f"added client {args.name} to {path}; its token follows, shown this once", file=sys.stderr)
    print(token, flush=True)
    return 0


def _tokens_revoke(args: argparse.Namespace) -> int:
    from tiergate import tokens

    path = _token_file(args)
    try:
        tokens.revoke(path, args.name)
    except tokens.TokenFileError as error:
        return _key_error(error)
    print(f"revoked client {args.name} in {path}; servers stop accepting its token once they reload the file")
    return 0


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


def _models_publish(args: argparse.Namespace) -> int:
    from tiergate.model_store import StoreError, publish

    try:
        published = publish(args.model_dir, args.store, args.version)
    except StoreError as error:
        return _key_error(error)
    print(
        f"published model set {published.model_version} as version {published.version} "
        f"({published.files} files, verified) at {published.location}"
    )
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    from tiergate.model_store import StoreError, fetch

    try:
        target = fetch(args.store, args.versions_dir, args.version)
    except StoreError as error:
        return _key_error(error)
    print(f"version {target.name} of {args.store} is in {target}, every file verified against its manifest")
    return 0


def _models_import(args: argparse.Namespace) -> int:
    from tiergate.manifest import UpstreamSpec
    from training.importer import ImportRefused, import_model

    upstream = None
    if args.upstream_model is not None:
        upstream = UpstreamSpec(
            model_name=args.upstream_model, output_name=args.upstream_output or "", scores=args.cloud_scores
        )
    try:
        number, path = import_model(
            args.models,
            args.name,
            edge=args.edge,
            cloud=args.cloud,
            labels_file=args.labels,
            input_value=args.input,
            input_name=args.input_name,
            quantize=args.quantize,
            calibration=args.calibration,
            positive_label=args.positive_label,
            edge_scores=args.edge_scores,
            cloud_scores=args.cloud_scores,
            edge_output=args.edge_output or "",
            cloud_output=args.cloud_output or "",
            upstream=upstream,
        )
    except ImportRefused as error:
        print(f"tiergate: import refused, nothing written: {error}", file=sys.stderr)
        return 2
    print(
        f"imported {args.name} version {number} into {path}; routing is a placeholder until "
        f"`tiergate calibrate {args.name} --models {args.models} --data FILE --target-escalation 0.15`"
    )
    return 0


def _calibrate_named(args: argparse.Namespace) -> int:
    from tiergate.manifest import ManifestError, newest_verified
    from training.importer import ImportRefused, calibrate_on_data

    if args.data is None or (args.target_escalation is None) == (args.target_quality is None):
        print("calibrating a model by name takes --data FILE and one of --target-escalation or --target-quality")
        return 2
    try:
        chosen = newest_verified(args.models / args.name)
        routing = calibrate_on_data(
            chosen.path, args.data, target_escalation=args.target_escalation, target_quality=args.target_quality
        )
    except (ImportRefused, ManifestError) as error:
        print(f"tiergate: calibration refused: {error}", file=sys.stderr)
        return 2
    print(
        f"{args.name} version {chosen.version or chosen.manifest.version}: threshold {routing.threshold:.4f} on "
        f"signal {routing.signal}: {routing.calibration}"
    )
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from training.calibrate import calibrate, calibrate_from_feedback

    if args.name is not None:
        return _calibrate_named(args)

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
        keys_dir=args.keys,
        requests=args.requests,
        concurrency=args.concurrency,
        log_format=args.log_format,
        repository=args.repository,
    )
    return run_demo(options)


def _bench(args: argparse.Namespace) -> int:
    from app.bench import run_bench
    from app.bench_perf import PerfOptions

    perf = PerfOptions(
        seconds=args.perf_seconds, peers=not args.no_peers, build_dir=args.build_dir, json_path=args.json
    )
    return run_bench(
        args.models, args.data, args.keys, requests=args.requests, calls=args.calls, skip=args.skip, perf=perf
    )


def _bench_sections(value: str) -> list[str]:
    """`--skip`: comma-separated names of the bench's sections."""
    from app.bench import SECTIONS

    names = [name for name in value.split(",") if name]
    if unknown := sorted(set(names) - set(SECTIONS)):
        raise argparse.ArgumentTypeError(
            f"unknown sections {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}"
        )
    return names


def _audit_verify(args: argparse.Namespace) -> int:
    from tiergate.audit import verify_command

    return verify_command(args.file)


def _add_key_commands(commands: argparse._SubParsersAction) -> None:
    """`tiergate keys ...` and `tiergate tokens ...`."""
    from tiergate import keys as keys_module

    keys = commands.add_parser(
        "keys",
        help="create a key directory, rotate the sealing key, issue client certificates",
        description=keys_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).add_subparsers(dest="action", required=True)
    init = keys.add_parser(
        "init",
        help="write a key directory: keyring, development CA, cloud and gateway certificates, empty token file",
    )
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument(
        "--cloud-name",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP address the gateway reaches the cloud by (repeatable; localhost, "
        "tiergate-cloud and 127.0.0.1 are always in)",
    )
    init.add_argument(
        "--gateway-name",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP address for the gateway's certificate (repeatable)",
    )
    init.add_argument("--days", type=int, default=keys_module.DEFAULT_DAYS, help="certificate validity in days")
    init.add_argument("--force", action="store_true", help="replace the files of an existing key directory")
    init.set_defaults(handler=_keys_init)

    rotate = keys.add_parser(
        "rotate",
        help="add a sealing key: at once, or in two steps (--stage, then --activate)",
        description="Add a new sealing key to DIR/seal-keys.json (or to a keyring file). Without options it seals "
        "at once: fine when both tiers read the same file. Across machines, roll out in two steps: --stage adds "
        "the key everywhere first (both tiers load it, so either can open it); only then --activate makes it "
        "seal. Older keys stay, so what they sealed still opens.",
    )
    rotate.add_argument("dir", type=Path, metavar="DIR", help="key directory, or a keyring file")
    step = rotate.add_mutually_exclusive_group()
    step.add_argument("--stage", action="store_true", help="step 1: add the new key without sealing with it")
    step.add_argument(
        "--activate",
        nargs="?",
        const="",
        default=None,
        metavar="KEY_ID",
        help="step 2: make KEY_ID (default: the newest key) the key that seals",
    )
    rotate.set_defaults(handler=_keys_rotate)

    client = keys.add_parser(
        "client-cert", help="issue a client certificate (subject CN NAME) signed by the key directory's CA"
    )
    client.add_argument("dir", type=Path, metavar="DIR")
    client.add_argument("name", metavar="NAME", help="the client's name, as in the token file")
    client.add_argument("--days", type=int, default=keys_module.DEFAULT_DAYS, help="validity in days")
    client.add_argument("--force", action="store_true", help="replace an existing certificate for NAME")
    client.set_defaults(handler=_keys_client_cert)

    tokens = commands.add_parser("tokens", help="issue and revoke client tokens for the public port").add_subparsers(
        dest="action", required=True
    )
    for action, handler, summary in (
        ("add", _tokens_add, "add a client and print its new token, once, alone on stdout"),
        ("revoke", _tokens_revoke, "remove a client; its token stops working when the servers reload the file"),
    ):
        sub = tokens.add_parser(action, help=summary, description=summary)
        sub.add_argument("name", metavar="NAME", help="the client's name")
        if action == "add":
            sub.add_argument(
                "--models", required=True, metavar="M[,M...]", help="models the client may call; '*' for all"
            )
        where = sub.add_mutually_exclusive_group(required=True)
        where.add_argument("--keys", type=Path, metavar="DIR", help="the token file of this key directory")
        where.add_argument("--file", type=Path, metavar="PATH", help="this token file")
        sub.set_defaults(handler=handler)


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

    models = commands.add_parser("models", help="build, publish and fetch model sets").add_subparsers(
        dest="action", required=True
    )
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
    publish = models.add_parser(
        "publish", help="verify a built model set and add it to a store as its next numbered version"
    )
    publish.add_argument("model_dir", type=Path, help="a built model set (a directory with manifest.json)")
    publish.add_argument("store", help="a directory or URL (s3://..., gs://... with s3fs / gcsfs installed)")
    publish.add_argument("--version", type=int, default=None, help="the version number (default: the next)")
    publish.set_defaults(handler=_models_publish)
    fetch = models.add_parser(
        "fetch", help="copy a version of a store into a versions directory, verified before it appears there"
    )
    fetch.add_argument("store", help="a directory or URL written by `tiergate models publish`")
    fetch.add_argument("versions_dir", type=Path, help="the directory `serve --models` reads (numbered versions)")
    fetch.add_argument("--version", type=int, default=None, help="the version to fetch (default: the newest)")
    fetch.set_defaults(handler=_models_fetch)

    imp = models.add_parser(
        "import",
        help="add your own ONNX pair as the next version of a model in a repository",
        description="Checks the files against the declaration (inputs, output, two sample rows) before writing "
        "anything, then adds them as REPOSITORY/NAME/<next version>. Routing is a placeholder until `tiergate "
        "calibrate NAME --data FILE`.",
    )
    imp.add_argument("name", help="the model name callers use (model_name)")
    imp.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR, help="the repository (one directory per model)")
    imp.add_argument("--edge", type=Path, required=True, help="the edge tier's ONNX file (FP32, or INT8 already)")
    imp.add_argument("--cloud", type=Path, default=None, help="the cloud tier's ONNX file")
    imp.add_argument("--labels", type=Path, required=True, help="labels, one per line, in output column order")
    imp.add_argument(
        "--input",
        required=True,
        help="text:ngrams | text:tokenizer=FILE | tensor:FP32:[-1,D] | tensor:INT64:[-1,D]",
    )
    imp.add_argument("--input-name", default=None, help="the input's name for callers (default: text, or input)")
    imp.add_argument("--quantize", choices=("dynamic", "qdq"), default=None, help="make the INT8 edge file")
    imp.add_argument("--calibration", type=Path, default=None, help="rows for --quantize qdq (CSV or .npz)")
    imp.add_argument("--positive-label", default=None, help="a binary model: its positive label (listed second)")
    for tier in ("edge", "cloud"):
        imp.add_argument(
            f"--{tier}-scores",
            choices=("logits", "probabilities", "probability"),
            default="logits",
            help=f"what the {tier} graph's output holds (probability: one column, a binary model's positive label)",
        )
        imp.add_argument(f"--{tier}-output", default=None, help=f"the {tier} graph's output to read (default: first)")
    imp.add_argument(
        "--upstream-model",
        default=None,
        help="the cloud tier relays to this model of an existing OIP server (serve cloud --upstream); no --cloud",
    )
    imp.add_argument("--upstream-output", default=None, help="the upstream model's output to read (default: first)")
    imp.set_defaults(handler=_models_import)

    cal = commands.add_parser("calibrate", help="pick the escalation threshold on validation data")
    cal.add_argument(
        "name",
        nargs="?",
        default=None,
        help="a model of the repository --models (its newest version), calibrated on --data FILE: CSV (text,label) "
        "for a text input, .npz (x or the input's name, and y) for a tensor input",
    )
    cal.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    cal.add_argument(
        "--data", type=Path, default=None, help="the data the models were built from (with NAME: a labelled file)"
    )
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
        sub.add_argument(
            "--keys",
            type=Path,
            default=None,
            metavar="DIR",
            help="key directory from `tiergate keys init`: keyring, TLS files"
            + (" and token file" if name == "gateway" else "")
            + "; explicit settings win",
        )
        if name == "gateway":
            sub.add_argument("--cloud", default=None, help="cloud tier HOST:PORT")
            sub.add_argument("--edge-only", action="store_true", help="serve with the edge tier alone")
        else:
            sub.add_argument(
                "--upstream",
                default=None,
                metavar="HOST:PORT",
                help="relay every model to this OIP v2 server (Triton, KServe, MLServer) instead of running its "
                "ONNX file; envelopes are still opened and sealed here",
            )
        sub.set_defaults(handler=lambda a, r=runner: asyncio.run(r(a)) or 0)

    _add_key_commands(commands)

    audit = commands.add_parser("audit", help="check an audit log").add_subparsers(dest="action", required=True)
    verify = audit.add_parser(
        "verify",
        help="check the hash chain of an audit log and its rotated files; name the first bad line",
        description="Exit 0 when every line's hash chain holds (across PATH.N ... PATH.1, PATH), 1 at the first "
        "edited, inserted or deleted line, which it names.",
    )
    verify.add_argument("file", type=Path, metavar="FILE", help="the audit log (its rotated files beside it)")
    verify.set_defaults(handler=_audit_verify)

    demo = commands.add_parser("demo", help="build models if missing, start cloud + gateway, send traffic, summarise")
    demo.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    demo.add_argument("--data", type=Path, default=None, help="instacart-products directory (default: demo data)")
    demo.add_argument("--keys", type=Path, default=DEMO_KEYS, help="key directory for the demo (created on first use)")
    demo.add_argument("--requests", type=int, default=3000)
    demo.add_argument("--concurrency", type=int, default=8)
    demo.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="the repository served: the --models model and the purchase-propensity demo model "
        "(default: MODELS.repository beside --models)",
    )
    demo.set_defaults(handler=_demo)

    bench = commands.add_parser(
        "bench", help="edge INT8/FP32 vs cloud latency and size, then per-tier latency end to end"
    )
    bench.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    bench.add_argument("--data", type=Path, default=None)
    bench.add_argument(
        "--keys", type=Path, default=DEMO_KEYS, help="key directory for the bench (created on first use)"
    )
    bench.add_argument("--requests", type=int, default=2000, help="end-to-end requests")
    bench.add_argument("--calls", type=int, default=1000, help="timed batch-1 calls per model")
    bench.add_argument(
        "--skip",
        type=_bench_sections,
        default=[],
        help="comma-separated sections to leave out: tracing (3 stacks at once), sealing, hedging, performance",
    )
    bench.add_argument(
        "--no-peers", action="store_true", help="performance section without the peers (KServe, MLServer)"
    )
    bench.add_argument(
        "--build-dir", type=Path, default=Path("build"), help="where the peers' venvs are installed and kept"
    )
    bench.add_argument(
        "--json", type=Path, default=Path("reports/bench.json"), help="the performance section's results as JSON"
    )
    bench.add_argument(
        "--perf-seconds",
        type=float,
        default=3.0,
        help="timed seconds of each concurrent run of the performance section",
    )
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
