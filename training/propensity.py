"""A second demo model, on numeric features: purchase propensity, the recommendation side of the setting.

DEMO DATA: every row is generated here (user features and item features of a made-up shop); nothing comes from
a real catalogue. A buy depends on the features linearly and through interactions (a discount-loving user
meeting a discounted item, a frequent buyer meeting a matching category), so the edge (logistic regression,
one probability out) does well and the cloud (a small MLP, two logits out) does better. Both are trained in a
second or two, exported to ONNX, and brought in through `tiergate models import` like any user's pair, then
calibrated on held-out generated rows with `calibrate_on_data`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

NAME = "purchase-propensity"
LABELS = ("no_buy", "buy")
FEATURES = (
    "user_recency",
    "user_frequency",
    "user_basket_size",
    "user_discount_affinity",
    "item_price",
    "item_popularity",
    "item_discount",
    "category_match",
)
INPUT = f"tensor:FP32:[-1,{len(FEATURES)}]"
INPUT_NAME = "features"


def generate(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`rows` generated (features [rows, 8] float32, labels [rows] int64: 1 = buy)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(FEATURES))).astype(np.float32)
    recency, frequency, basket, affinity, price, popularity, discount, match = x.T
    logit = (
        -0.3
        - 0.8 * recency
        + 0.9 * frequency
        + 0.3 * basket
        - 0.7 * price
        + 0.5 * popularity
        + 0.4 * discount
        + 0.6 * match
        + 1.6 * affinity * discount
        + 1.2 * frequency * match
        - 0.9 * np.abs(price) * (recency > 0.5)
    )
    y = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return x, y


def _train(model: Any, x: np.ndarray, y: np.ndarray, steps: int, probability: bool, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    features, target = torch.from_numpy(x), torch.from_numpy(y)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(steps):
        optimiser.zero_grad()
        out = model(features)
        if probability:
            loss = torch.nn.functional.binary_cross_entropy(out[:, 0].clamp(1e-6, 1 - 1e-6), target.float())
        else:
            loss = torch.nn.functional.cross_entropy(out, target)
        loss.backward()
        optimiser.step()
    return model.eval()


def train_edge(x: np.ndarray, y: np.ndarray, seed: int = 0) -> Any:
    """Logistic regression: one probability (of `buy`) per row, [n, 1]."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 1), torch.nn.Sigmoid())
    return _train(model, x, y, steps=300, probability=True, seed=seed)


def train_cloud(x: np.ndarray, y: np.ndarray, seed: int = 0) -> Any:
    """A small MLP: two logits (no_buy, buy) per row."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 2),
    )
    return _train(model, x, y, steps=400, probability=False, seed=seed)


def export(model: Any, path: Path, output_name: str, width: int = len(FEATURES)) -> Path:
    """The model as an ONNX file taking `features` [batch, width] float32."""
    import torch

    from training.edge_train import quiet_onnx_export

    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_onnx_export(), torch.no_grad():
        torch.onnx.export(
            model,
            (torch.zeros(2, width),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


def build_propensity(repository: Path, seed: int = 0, rows: int = 8000) -> Path:
    """Train, export, import (INT8 edge, dynamic quantization) and calibrate the propensity pair as the next
    version of `purchase-propensity` in `repository`; returns the version's directory."""
    import torch

    from training.importer import calibrate_on_data, import_model

    torch.set_num_threads(1)
    x, y = generate(rows, seed)
    split = int(rows * 0.75)
    edge, cloud = train_edge(x[:split], y[:split], seed), train_cloud(x[:split], y[:split], seed)
    with tempfile.TemporaryDirectory(prefix="propensity-") as scratch:
        work = Path(scratch)
        export(edge, work / "edge.onnx", "probability")
        export(cloud, work / "cloud.onnx", "logits")
        (work / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
        np.savez(work / "validation.npz", x=x[split:], y=y[split:])
        _, version_dir = import_model(
            repository,
            NAME,
            edge=work / "edge.onnx",
            cloud=work / "cloud.onnx",
            labels_file=work / "labels.txt",
            input_value=INPUT,
            input_name=INPUT_NAME,
            quantize="dynamic",
            positive_label=LABELS[1],
            edge_scores="probability",
        )
        routing = calibrate_on_data(version_dir, work / "validation.npz", target_quality=0.99)
    logger.info(
        "%s (DEMO DATA, generated): threshold %.4f on %s, escalation %.3f",
        NAME,
        routing.threshold,
        routing.signal,
        routing.calibration["achieved_escalation"],
    )
    return version_dir
