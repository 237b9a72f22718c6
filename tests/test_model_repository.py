"""A model repository: the built-in text model and an imported tensor model served at once, with their own tiers,
routing and versions; `models import` / `calibrate NAME`; a cloud tier that relays to an existing OIP server.

Clients are unmodified `tritonclient.grpc` (in a process of its own: its protocol descriptors and ours cannot
share one process) and the gateway's own stubs; servers are real, on 127.0.0.1 port 0.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from app.cli import main as cli
from cloud_runtime.model import CloudModel
from proto.inference import grpc_service_pb2 as pb
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT, StackFactory
from tests.tap import TapProxy
from tiergate.constants import MODEL_NAME
from tiergate.errors import TierDeadlineError
from tiergate.manifest import load_manifest
from tiergate.settings import CloudSettings, GatewaySettings
from training import propensity

pytestmark = pytest.mark.slow

NAME = propensity.NAME
WIDTH = len(propensity.FEATURES)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's files, made here: an edge logistic regression (one probability) and a cloud MLP (two logits),
    both exported to ONNX from torch; labels; labelled held-out rows."""
    import torch

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("pair")
    x, y = propensity.generate(4000, seed=3)
    propensity.export(propensity.train_edge(x[:3000], y[:3000]), work / "edge.onnx", "probability")
    propensity.export(propensity.train_cloud(x[:3000], y[:3000]), work / "cloud.onnx", "logits")
    (work / "labels.txt").write_text("no_buy\nbuy\n", encoding="utf-8")
    np.savez(work / "heldout.npz", x=x[3000:], y=y[3000:])
    return work


def import_args(repository: Path, pair: Path, *extra: str) -> list[str]:
    return [
        "models",
        "import",
        NAME,
        "--models",
        str(repository),
        "--edge",
        str(pair / "edge.onnx"),
        "--cloud",
        str(pair / "cloud.onnx"),
        "--labels",
        str(pair / "labels.txt"),
        "--input",
        propensity.INPUT,
        "--input-name",
        "features",
        "--positive-label",
        "buy",
        "--edge-scores",
        "probability",
        *extra,
    ]


@pytest.fixture(scope="module")
def repository(tiny_models: Path, pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in text model as version 1 of product-category, and the pair imported (INT8 edge by dynamic
    quantization) and calibrated on its held-out rows through the command line."""
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(tiny_models, root / MODEL_NAME / "1")
    assert cli(import_args(root, pair, "--quantize", "dynamic")) == 0
    calibrate = ["calibrate", NAME, "--models", str(root), "--data", str(pair / "heldout.npz")]
    assert cli([*calibrate, "--target-escalation", "0.3"]) == 0
    return root


@pytest.fixture
async def start_repo(repository: Path, keyring_path: Path) -> AsyncIterator[StackFactory]:
    factory = StackFactory(repository, keyring_path)
    yield factory
    await factory.stop_all()


def features(rows: int, seed: int = 5) -> np.ndarray:
    return propensity.generate(rows, seed)[0]


async def tritonclient(target: str, *steps: dict[str, Any]) -> list[Any]:
    """The steps through unmodified tritonclient.grpc in a process of its own; the servers keep serving on this
    loop meanwhile."""
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    script = REPO_ROOT / "tests" / "scripts" / "triton_models.py"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        target,
        json.dumps(list(steps)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()
    seen: list[Any] = json.loads(out)
    return seen


def tensor_step(model: str, x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"op": "infer", "model": model, "tensor": x.tolist(), **extra}


def test_the_manifest_declares_the_tensor_input_the_binary_output_and_the_calibrated_routing(
    repository: Path,
) -> None:
    manifest = load_manifest(repository / NAME / "1")
    assert manifest.input.describe() == "'features' (FP32, shape [-1, 8])"
    assert (manifest.output.kind, manifest.output.positive_label, manifest.labels) == (
        "binary",
        "buy",
        ["no_buy", "buy"],
    )
    assert manifest.edge.onnx.path == "edge/edge_int8.onnx" and manifest.edge.fp32_onnx is not None
    assert manifest.edge.scores == "probability" and manifest.edge.preprocess == "tensor"
    calibration = manifest.routing.calibration
    assert calibration["split"] == "user data" and calibration["target"] == {"kind": "escalation", "value": 0.3}
    assert 0.2 <= calibration["achieved_escalation"] <= 0.4
    assert calibration["cloud_accuracy"] > calibration["edge_accuracy"], "the MLP learns the interactions"


async def test_two_models_at_once_each_with_its_own_tiers_and_reasons(start_repo: StackFactory) -> None:
    stack = await start_repo(max_edge_batch=64)
    x = features(64)
    index, meta, ready, tensor, forced, text = await tritonclient(
        stack.target,
        {"op": "index"},
        {"op": "metadata", "model": NAME},
        {"op": "ready", "model": NAME},
        tensor_step(NAME, x),
        tensor_step(NAME, x[:4], parameters={"tier": "cloud"}),
        {"op": "infer", "model": MODEL_NAME, "texts": ["organic whole milk", "paper towels"]},
    )
    assert {(m["name"], m["version"], m["state"]) for m in index} == {(MODEL_NAME, "1", "READY"), (NAME, "1", "READY")}
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "8"]}]
    assert ready is True
    assert set(tensor["label"]) <= {"no_buy", "buy"}
    assert set(tensor["tier"]) == {"edge", "cloud"}, "confident rows stay at the edge, unsure ones climb"
    pairs = zip(tensor["tier"], tensor["reasons"], strict=True)
    assert all((why == "low_confidence") == (tier == "cloud") for tier, why in pairs)
    assert all(0.5 <= c <= 1.0 for c in tensor["confidence"]), "the probability of the label given, of two"
    assert list(zip(forced["tier"], forced["reasons"], strict=True)) == [("cloud", "client_hint")] * 4
    assert len(text["label"]) == 2 and set(text["tier"]) <= {"edge", "cloud"}
    assert stack.cloud is not None
    cloud_rows = stack.cloud.metrics.registry.get_sample_value("tiergate_cloud_rows_total", {"model": NAME})
    assert cloud_rows is not None and cloud_rows >= 4, "the cloud ran the tensor model's escalated rows"


async def test_raw_and_typed_tensor_contents_give_the_same_answers(start_repo: StackFactory) -> None:
    stack = await start_repo(with_cloud=False, configure=edge_only)
    x = features(8)
    typed = pb.ModelInferRequest(model_name=NAME)
    tensor = typed.inputs.add(name="features", datatype="FP32", shape=[8, WIDTH])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    raw = pb.ModelInferRequest(model_name=NAME, raw_input_contents=[x.astype("<f4").tobytes()])
    raw.inputs.add(name="features", datatype="FP32", shape=[8, WIDTH])
    by_typed, by_raw = await stack.stub.ModelInfer(typed), await stack.stub.ModelInfer(raw)
    assert list(by_typed.outputs[0].contents.bytes_contents) == _raw_labels(by_raw, 8)


def _raw_labels(response: pb.ModelInferResponse, rows: int) -> list[bytes]:
    data, labels, offset = response.raw_output_contents[0], [], 0
    for _ in range(rows):
        (length,) = struct.unpack_from("<I", data, offset)
        labels.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return labels


def edge_only(gateway: GatewaySettings, cloud: CloudSettings) -> None:
    gateway.chain = ["edge"]


async def test_bad_input_names_the_expected_input(start_repo: StackFactory) -> None:
    stack = await start_repo(with_cloud=False, configure=edge_only)
    x = features(2)
    seen = await tritonclient(
        stack.target,
        {"op": "infer", "model": NAME, "texts": ["milk"], "name": "features"},
        {"op": "infer", "model": NAME, "texts": ["milk"]},
        tensor_step(NAME, x[:, :7]),
        tensor_step(NAME, x.astype(np.int64), datatype="INT64"),
        tensor_step(NAME, np.full((1, WIDTH), np.nan)),
        tensor_step(MODEL_NAME, x),
        tensor_step("no-such-model", x),
        tensor_step(NAME, x, version="9"),
        tensor_step(NAME, x),
    )
    expected = [
        ("INVALID_ARGUMENT", "must have datatype FP32, got 'BYTES'; this model takes 'features' (FP32, shape [-1, 8])"),
        ("INVALID_ARGUMENT", "missing input 'features': this model takes 'features' (FP32, shape [-1, 8])"),
        ("INVALID_ARGUMENT", "has shape [2, 7]; this model takes 'features' (FP32, shape [-1, 8])"),
        ("INVALID_ARGUMENT", "must have datatype FP32, got 'INT64'"),
        ("INVALID_ARGUMENT", "row 0 of input 'features' holds NaN or infinity"),
        ("INVALID_ARGUMENT", "this model takes 'text' (BYTES, shape [-1])"),
        ("NOT_FOUND", f"available models: {MODEL_NAME}, {NAME}"),
        ("NOT_FOUND", "has no version '9'; available: 1"),
    ]
    for answer, (code, message) in zip(seen, expected, strict=False):
        assert answer["status"] == f"StatusCode.{code}" and message in answer["message"], answer
    assert len(seen[-1]["label"]) == 2, "the gateway went on serving"


async def test_raw_contents_of_the_wrong_size_are_refused(start_repo: StackFactory) -> None:
    stack = await start_repo(with_cloud=False, configure=edge_only)
    request = pb.ModelInferRequest(model_name=NAME, raw_input_contents=[b"\x00" * (4 * WIDTH - 1)])
    request.inputs.add(name="features", datatype="FP32", shape=[1, WIDTH])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.ModelInfer(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "hold 31 bytes; shape [1, 8] of FP32 needs 32" in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (["--labels", "THREE"], "the negative one first and the positive one ('buy') second"),
        (["--cloud-scores", "probability"], "cloud model cloud.onnx output 'logits' (probability): a one-probability"),
        (
            ["--input", "tensor:FP32:[-1,7]"],
            "has shape [-1, 8]; the declared input is 'features' (FP32, shape [-1, 7])",
        ),
        (["--input", "text:ngrams"], "takes integer ids; its input 'features' (tensor(float)) is not"),
        (["--edge-output", "scores"], "edge model edge.onnx has no output 'scores'; its outputs are ['probability']"),
    ],
    ids=["labels", "scores", "shape", "text-declared", "output-name"],
)
def test_an_import_that_does_not_match_fails_before_writing_anything(
    pair: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: list[str], refusal: str
) -> None:
    (pair / "three.txt").write_text("a\nb\nc\n", encoding="utf-8")
    flag, value = change
    args = [*import_args(tmp_path / "repo", pair), flag, str(pair / "three.txt") if value == "THREE" else value]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "import refused, nothing written" in err and refusal in err, err
    written = list((tmp_path / "repo").rglob("*")) if (tmp_path / "repo").exists() else []
    assert [p for p in written if p.is_file()] == [], "no file was written"


async def test_version_2_added_while_version_1_serves_both_answer_by_version(
    pair: Path, repository: Path, keyring_path: Path, tmp_path: Path
) -> None:
    root = tmp_path / "repo"
    shutil.copytree(repository / NAME, root / NAME)

    def two_versions(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.chain = ["edge"]
        gateway.serve_versions = 2
        gateway.reload_poll_s = 0.1

    factory = StackFactory(root, keyring_path)
    try:
        stack = await factory(with_cloud=False, model_name=NAME, configure=two_versions)
        x = features(4)
        (before,) = await tritonclient(stack.target, tensor_step(NAME, x))
        assert before["model_version"] == "1"
        qdq = ["--quantize", "qdq", "--calibration", str(pair / "heldout.npz")]
        assert cli([*import_args(root, pair), *qdq]) == 0  # version 2: a static QDQ INT8 edge file
        for _ in range(100):  # bounded: the watch polls every 0.1 s
            index = [(state.version, state.state.value) for state in stack.gateway.repository.index()]
            if index == [("1", "READY"), ("2", "READY")]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"version 2 did not come to serve beside version 1: {index}")
        listed, one, two, newest, missing = await tritonclient(
            stack.target,
            {"op": "index"},
            tensor_step(NAME, x, version="1"),
            tensor_step(NAME, x, version="2"),
            tensor_step(NAME, x),
            tensor_step(NAME, x, version="7"),
        )
        assert [(m["name"], m["version"], m["state"]) for m in listed] == [(NAME, "1", "READY"), (NAME, "2", "READY")]
        assert (one["model_version"], two["model_version"]) == ("1", "2") and len(one["label"]) == len(
            two["label"]
        ) == 4
        assert newest["model_version"] == "2", "a request naming no version gets the newest"
        assert missing["status"] == "StatusCode.NOT_FOUND" and "available: 1, 2" in missing["message"]
    finally:
        await factory.stop_all()


class Upstream(pb_grpc.GRPCInferenceServiceServicer):
    """A small OIP v2 server standing in for the user's Triton: it runs the tiny cloud model on BYTES rows and
    answers its logits (FP32 [n, K], raw contents), recording every text it is sent."""

    def __init__(self, model: CloudModel) -> None:
        self.model = model
        self.seen: list[str] = []

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        data, texts, offset = request.raw_input_contents[0], [], 0
        while offset < len(data):
            (length,) = struct.unpack_from("<I", data, offset)
            texts.append(data[offset + 4 : offset + 4 + length].decode())
            offset += 4 + length
        self.seen.extend(texts)
        logits = self.model.logits(texts)
        response = pb.ModelInferResponse(model_name=request.model_name, raw_output_contents=[logits.tobytes()])
        response.outputs.add(name="scores", datatype="FP32", shape=list(logits.shape))
        return response


async def test_the_cloud_relays_to_an_upstream_oip_server_and_the_hop_stays_sealed(
    start_stack: StackFactory, tiny_models: Path
) -> None:
    model = CloudModel.load(tiny_models)
    upstream = Upstream(model)
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(upstream, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    def relay(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        cloud.upstream = f"127.0.0.1:{port}"

    tap: TapProxy | None = None
    try:
        backend = await start_stack(configure=relay)
        assert backend.cloud is not None and backend.cloud.upstream is not None
        tap = TapProxy(backend.cloud.managed.port)
        tap_port = await tap.start()
        tapped = await start_stack(with_cloud=False, cloud_target=f"127.0.0.1:{tap_port}")
        # The second row's slip is corrected before it is relayed, as the edge corrects it (the model's vocabulary).
        texts = ["zzqx organic heirloom tomatoes", "zzqx vanila yogurt"]
        assert model.spelling is not None and model.spelling.correct(texts[1]) == "zzqx vanilla yogurt"
        (result,) = await tritonclient(
            tapped.target, {"op": "infer", "model": MODEL_NAME, "texts": texts, "parameters": {"tier": "cloud"}}
        )
        assert result["tier"] == ["cloud", "cloud"] and result["reasons"] == ["client_hint"] * 2
        expected = model.predict(texts)
        assert result["label"] == [model.labels[int(i)] for i in expected.label_index]
        np.testing.assert_allclose(result["confidence"], expected.probability, rtol=1e-5)
        assert upstream.seen == [texts[0], "zzqx vanilla yogurt"], "the opened rows, inside the cloud network"
        assert len(tap.to_upstream) > 0
        assert b"zzqx" not in bytes(tap.to_upstream) and b"zzqx" not in bytes(tap.to_client), "no plaintext"
    finally:
        await start_stack.stop_all()
        if tap is not None:
            await tap.close()
        await server.stop(0)
        model.close()


async def test_text_models_import_with_hashed_ngrams_or_a_tokenizer_and_serve_on_both_tiers(
    tmp_path: Path, keyring_path: Path
) -> None:
    """Two text models a team would bring: one fed the built-in hashed n-grams (its graphs take the featurizer's
    ids), one fed its own `tokenizers` tokenizer (its graphs take input_ids and attention_mask)."""
    import torch

    from tiergate.features import HashedNgramFeaturizer
    from training.cloud_train import TinyCloudNet, export_cloud_onnx, save_tokenizer, train_wordlevel_tokenizer
    from training.edge_train import EdgeNet, export_edge_onnx

    torch.manual_seed(0)
    work, root = tmp_path / "files", tmp_path / "repo"
    work.mkdir()
    (work / "intents.txt").write_text("browse\nbuy\nsupport\n", encoding="utf-8")
    ngrams = HashedNgramFeaturizer()
    export_edge_onnx(EdgeNet(ngrams.n_buckets, 8, 8, 3), work / "ngram_edge.onnx", ngrams.max_features)
    export_edge_onnx(EdgeNet(ngrams.n_buckets, 16, 16, 3), work / "ngram_cloud.onnx", ngrams.max_features)
    words = ["cheap flights to rome", "where is my order", "buy running shoes size 10", "return a jacket"]
    tokenizer = save_tokenizer(train_wordlevel_tokenizer(words, 64), work / "tokenizer.json", 64)
    vocab = train_wordlevel_tokenizer(words, 64).get_vocab_size()
    export_cloud_onnx(TinyCloudNet(vocab, 8, 3), work / "tok_edge.onnx")
    export_cloud_onnx(TinyCloudNet(vocab, 16, 3), work / "tok_cloud.onnx")
    for name, prefix, declared in (
        ("relevance", "ngram", "text:ngrams"),
        ("query-intent", "tok", f"text:tokenizer={tokenizer}"),
    ):
        files = ["--edge", str(work / f"{prefix}_edge.onnx"), "--cloud", str(work / f"{prefix}_cloud.onnx")]
        args = ["models", "import", name, "--models", str(root), *files, "--labels", str(work / "intents.txt")]
        assert cli([*args, "--input", declared, "--quantize", "dynamic"]) == 0
    manifest = load_manifest(root / "query-intent" / "1")
    assert manifest.edge.preprocess == manifest.cloud.preprocess == "tokenizer"
    assert load_manifest(root / "relevance" / "1").edge.preprocess == "ngrams"

    factory = StackFactory(root, keyring_path)
    try:
        stack = await factory()
        queries = ["where is my order 1234", "cheap flights"]
        seen = await tritonclient(
            stack.target,
            *(
                {"op": "infer", "model": model, "texts": queries, "parameters": {"tier": tier}}
                for model in ("relevance", "query-intent")
                for tier in ("edge", "cloud")
            ),
        )
        for answer, tier in zip(seen, ["edge", "cloud"] * 2, strict=True):
            assert answer["tier"] == [tier, tier] and set(answer["label"]) <= {"browse", "buy", "support"}, answer
    finally:
        await factory.stop_all()


class TensorUpstream(pb_grpc.GRPCInferenceServiceServicer):
    """An OIP server answering a tensor model: one probability per row (the mean of its features, squashed),
    as FP32 typed contents, under the output name `p`; it records the rows it was sent."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []
        self.delay_s = 0.0

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        await asyncio.sleep(self.delay_s)
        shape = list(request.inputs[0].shape)
        rows = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(shape)
        self.seen.append(rows)
        p = 1.0 / (1.0 + np.exp(-rows.mean(axis=1)))
        response = pb.ModelInferResponse(model_name=request.model_name)
        response.outputs.add(name="other", datatype="FP32", shape=[len(rows)]).contents.fp32_contents.extend(
            [0.0] * len(rows)
        )
        out = response.outputs.add(name="p", datatype="FP32", shape=[len(rows), 1])
        out.contents.fp32_contents.extend(p.astype(np.float32).tolist())
        return response


async def test_a_tensor_model_relayed_upstream_maps_one_probability_onto_its_labels(repository: Path) -> None:
    from cloud_runtime.upstream import UpstreamModel
    from tiergate.inputs import Vector
    from tiergate.manifest import UpstreamSpec

    upstream = TensorUpstream()
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(upstream, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    manifest = load_manifest(repository / NAME / "1")
    spec = UpstreamSpec(model_name="propensity-full", output_name="p", scores="probability")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            model = UpstreamModel(
                channel,
                f"127.0.0.1:{port}",
                name=NAME,
                input_spec=manifest.input,
                labels=manifest.labels,
                spec=spec,
                temperature=1.0,
                signal="max_prob",
                timeout_s=0.3,
            )
            x = np.array([[2.0] * WIDTH, [-2.0] * WIDTH], dtype=np.float32)
            scored = await model.predict([Vector(row) for row in x], timeout=5.0)
            upstream.delay_s = 1.0  # slower than the upstream timeout, though the caller would wait 5 s
            started = asyncio.get_running_loop().time()
            with pytest.raises(TierDeadlineError, match="did not answer in time"):
                await model.predict([Vector(row) for row in x], timeout=5.0)
            assert asyncio.get_running_loop().time() - started < 0.9
    finally:
        await server.stop(0)
    np.testing.assert_array_equal(upstream.seen[0], x)
    assert [manifest.labels[int(i)] for i in scored.label_index] == ["buy", "no_buy"]
    np.testing.assert_allclose(scored.probability, [1 / (1 + np.exp(-2.0))] * 2, rtol=1e-5)
