"""An edge candidate that carries the cloud's lexical branch: its distilled n-gram MLP and the cloud's own TF-IDF
linear model, fused in one graph.

The cascade's quality is how often the edge's confident answers are the cloud's answers. The cloud's answer is a
fusion of MiniLM and the lexical branch; an edge that carries that same branch (the identical weights) agrees with
the cloud wherever the branch decides the cloud's answer, which a separately trained MLP only approximates. The
graph takes one row of ids, the MLP's block then the branch's blocks (one ``NgramBlocks`` featurizer), and gives
``alpha * log_softmax(mlp) + (1 - alpha) * log_softmax(gamma * lexical)``, with alpha and gamma fitted on
validation as the cloud fits its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tiergate.features import HashedNgramFeaturizer, NgramBlocks
from training.cloud_train import Fusion, LexicalHead, fit_fusion, fuse, fused_log_probs
from training.edge_train import EdgeNet
from training.lexical import LexicalModel
from training.measure import accuracy


class EdgeLexicalNet(nn.Module):
    """ids int [n, mlp width + lexical widths] -> fused log-probabilities [n, K]."""

    def __init__(self, mlp: EdgeNet, mlp_width: int, lexical: LexicalModel, fusion: Fusion) -> None:
        super().__init__()
        self.mlp = mlp
        self.mlp_width = mlp_width
        self.lexical = LexicalHead(lexical)
        self.fusion = fusion

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The fused log-probabilities of the MLP and the lexical branch."""
        return fused_log_probs(self.mlp(ids[:, : self.mlp_width]), self.lexical(ids[:, self.mlp_width :]), self.fusion)


def edge_featurizer(mlp: HashedNgramFeaturizer, lexical: LexicalModel) -> NgramBlocks:
    """The served featurizer: the MLP's block, then the lexical branch's blocks."""
    return NgramBlocks([mlp, *NgramBlocks.from_config(lexical.featurizer).blocks])


def with_lexical(
    mlp: EdgeNet,
    featurizer: HashedNgramFeaturizer,
    lexical: LexicalModel,
    val_mlp_logits: np.ndarray,
    val_texts: list[str],
    val_y: np.ndarray,
) -> tuple[EdgeLexicalNet, NgramBlocks, dict[str, Any]]:
    """The fused edge graph (fusion fitted on validation), its featurizer, and what the fit measured."""
    val_lexical = lexical.margins(lexical.featurize(val_texts))
    fusion = fit_fusion(val_mlp_logits, val_lexical, val_y)
    net = EdgeLexicalNet(mlp, featurizer.max_features, lexical, fusion)
    net.eval()
    info = {
        "fusion": fusion.as_dict(),
        "validation_accuracy_by_part": {
            "mlp": accuracy(val_mlp_logits, val_y),
            "lexical": accuracy(val_lexical, val_y),
            "fused": accuracy(fuse(val_mlp_logits, val_lexical, fusion), val_y),
        },
    }
    return net, edge_featurizer(featurizer, lexical), info
