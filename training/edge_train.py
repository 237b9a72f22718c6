"""The edge network (hashed n-gram embedding, masked mean, small MLP), its distillation training and ONNX export."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tiergate.logs import show_progress
from training.config import EdgeConfig
from training.measure import accuracy

logger = logging.getLogger(__name__)


class EdgeNet(nn.Module):
    """nn.Embedding + mean over non-padding ids + MLP; exports to plain Gather/ReduceSum/MatMul ONNX."""

    def __init__(self, n_buckets: int, dim: int, hidden: int, n_labels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_buckets, dim, padding_idx=0, sparse=True)
        nn.init.normal_(self.embedding.weight, std=0.05)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.n_labels = n_labels
        self.mlp = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_labels),
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int [n, L] -> logits float [n, K]."""
        ids = ids.long()
        mask = (ids != 0).unsqueeze(-1).to(torch.float32)
        summed = (self.embedding(ids) * mask).sum(dim=1)
        count = mask.sum(dim=1).clamp(min=1.0)
        return self.mlp(summed / count)


def kd_loss(
    logits: torch.Tensor, hard: torch.Tensor, soft_logits: torch.Tensor | None, alpha: float, t: float
) -> torch.Tensor:
    """alpha x KL(teacher || student) at temperature t (scaled by t^2) + (1 - alpha) x cross-entropy on hard labels."""
    ce = nn.functional.cross_entropy(logits, hard)
    if soft_logits is None or alpha <= 0.0:
        return ce
    teacher = nn.functional.softmax(soft_logits / t, dim=1)
    student = nn.functional.log_softmax(logits / t, dim=1)
    kd = nn.functional.kl_div(student, teacher, reduction="batchmean") * (t * t)
    return alpha * kd + (1.0 - alpha) * ce


def predict_edge(model: EdgeNet, ids: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """float32 logits of the torch edge model."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            out.append(model(torch.from_numpy(ids[start : start + batch_size])).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.n_labels), dtype=np.float32)


def train_edge(
    config: EdgeConfig,
    train_ids: np.ndarray,
    train_y: np.ndarray,
    n_labels: int,
    val_ids: np.ndarray,
    val_y: np.ndarray,
    teacher_logits: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[EdgeNet, dict[str, Any]]:
    """Train with hard labels plus (when given) the teacher's soft labels; keep the best validation epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = EdgeNet(config.n_buckets, config.dim, config.hidden, n_labels, config.dropout)
    sparse_opt = torch.optim.SparseAdam(list(model.embedding.parameters()), lr=config.embedding_lr)
    dense_opt = torch.optim.AdamW(model.mlp.parameters(), lr=config.lr, weight_decay=1e-4)
    x = torch.from_numpy(train_ids)
    y = torch.from_numpy(train_y.astype(np.int64))
    soft = None if teacher_logits is None else torch.from_numpy(teacher_logits.astype(np.float32))
    best_acc, best_state, best_epoch, stale = -1.0, copy.deepcopy(model.state_dict()), 0, 0
    history = []
    for epoch in range(config.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(train_ids)))
        batches = range(0, len(order), config.batch_size)
        desc = f"edge {config.name} epoch {epoch + 1}"
        bar = tqdm(batches, desc=desc, disable=not show_progress(progress), leave=False)
        for start in bar:
            index = order[start : start + config.batch_size]
            logits = model(x[index])
            loss = kd_loss(
                logits, y[index], None if soft is None else soft[index], config.kd_alpha, config.kd_temperature
            )
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss.backward()
            sparse_opt.step()
            dense_opt.step()
        acc = accuracy(predict_edge(model, val_ids), val_y, digits=None)
        history.append(round(acc, 4))
        logger.info("edge %s epoch %d validation accuracy %.4f", config.name, epoch + 1, acc)
        if acc > best_acc:
            best_acc, best_state, best_epoch, stale = acc, copy.deepcopy(model.state_dict()), epoch + 1, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, {"best_epoch": best_epoch, "validation_accuracy_torch": round(best_acc, 4), "history": history}


def export_edge_onnx(model: nn.Module, path: Path, max_features: int, opset: int = 17) -> Path:
    """Single-file ONNX: input ``ids`` int32 [batch, L], output ``logits`` float32 [batch, K] (an ``EdgeNet``, or
    an ``edge_lexical.EdgeLexicalNet``, whose ids are several blocks and whose logits are log-probabilities)."""
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.ones((2, max_features), dtype=torch.int32)
    with quiet_onnx_export():
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["ids"],
            output_names=["logits"],
            dynamic_axes={"ids": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


@contextmanager
def quiet_onnx_export() -> Iterator[None]:
    """Silence, for one ``torch.onnx.export`` call, the warnings the TorchScript exporter gives on every export.

    Each is expected here: the legacy exporter is chosen on purpose (one self-contained file at a fixed
    opset); the tracer's notes on Python-side shape checks and the opset note on advanced indexing are about
    graphs that could differ from eager torch, and every exported graph is measured through the serving
    runtime on validation rows right after the export, so a wrong one shows there. Other warnings still show.
    """
    with warnings.catch_warnings():
        # torch.jit documents TracerWarning but its stubs do not re-export it.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index operator of advanced indexing", UserWarning)
        yield
