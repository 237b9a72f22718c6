"""Measures edge architectures other than the hashed n-gram MLP (truncated MiniLM) against a built model set."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cloud_runtime.model import CloudModel
from tiergate.logs import show_progress
from tiergate.manifest import load_manifest, write_manifest
from training.build import alternative_row
from training.config import QUALITY_FLOOR, EdgeConfig, within_edge_bounds
from training.data import DataSplit, load_split_for_manifest
from training.measure import VariantMeasurement, batched_components, batched_logits, measure_variant

logger = logging.getLogger(__name__)

LATENCY_SAMPLES = 200
SERVED_VARIANT = "dynamic_per_channel"


def truncated_minilm_alternative(
    model_dir: Path,
    data_dir: Path | None,
    work_dir: Path,
    layers: int = 2,
    epochs: int = 1,
    max_length: int = 32,
    seed: int = 0,
    record: bool = True,
) -> dict[str, Any]:
    """Distil the first ``layers`` of MiniLM from the built cloud model, quantize per channel, and measure it.

    The measured candidate is appended to the manifest's ``metrics.edge_alternatives`` (metrics are not
    checksummed, so the served files are untouched). The candidate uses the cloud tier's ONNX interface,
    so it is measured through the same CloudModel runtime code.
    """
    import torch
    from tqdm import tqdm

    from tiergate.features import encode_batch, prepare_tokenizer
    from training.calibrate import fit_temperature, least_escalation_at_floor
    from training.cloud_train import (
        MiniLMClassifier,
        export_cloud_onnx,
        length_bucketed_batches,
        minilm_tokenizer,
        save_tokenizer,
    )
    from training.edge_train import kd_loss
    from training.quantize import quantize_dynamic_int8

    torch.set_num_threads(2)
    started = time.perf_counter()
    model_dir, work_dir = Path(model_dir), Path(work_dir)
    manifest = load_manifest(model_dir)
    data = DataSplit.of(*load_split_for_manifest(manifest, data_dir))
    train, val = data.train, data.validation
    labels = data.train.labels
    teacher = CloudModel.load(model_dir, manifest, intra_op_threads=2)
    t0 = time.perf_counter()
    # A truncated MiniLM learns from the cloud's MiniLM part where the graph has parts: the fused
    # logits on training rows carry a lexical branch that has memorised them.
    teacher_output = "deep_logits" if "deep_logits" in teacher.outputs else "logits"
    teacher_train = batched_components(teacher, train.texts)[teacher_output]
    cloud_right_val = batched_logits(teacher, val.texts).argmax(1) == val.y
    teacher.close()
    teacher_s = time.perf_counter() - t0

    # Student: the pretrained MiniLM cut to its first layers, trained on soft + hard labels with the edge's
    # distillation weights (the shared cloud loop uses hard labels only, so distillation has its own loop here).
    distil = EdgeConfig()
    student = MiniLMClassifier(len(labels))
    student.encoder.encoder.layer = student.encoder.encoder.layer[:layers]
    student.encoder.config.num_hidden_layers = layers
    tokenizer = minilm_tokenizer()
    pad_id = prepare_tokenizer(tokenizer, max_length)
    optimizer = torch.optim.AdamW(
        [{"params": student.encoder.parameters(), "lr": 1.5e-4}, {"params": student.head.parameters(), "lr": 3e-3}],
        weight_decay=0.01,
    )
    lengths = np.array([len(e.ids) for e in tokenizer.encode_batch(train.texts)])
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    y = torch.from_numpy(train.y.astype(np.int64))
    soft = torch.from_numpy(teacher_train)
    batches_per_epoch = int(np.ceil(len(train) / 64))
    total = batches_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))

    t0 = time.perf_counter()
    for epoch in range(epochs):
        student.train()
        batches = length_bucketed_batches(lengths, 64, rng)
        bar = tqdm(batches, desc=f"minilm-{layers}L distil {epoch + 1}", disable=not show_progress(), leave=False)
        for index in bar:
            ids, mask = encode_batch(tokenizer, [train.texts[i] for i in index], pad_id)
            logits = student(torch.from_numpy(ids), torch.from_numpy(mask))
            idx = torch.from_numpy(index)
            loss = kd_loss(logits, y[idx], soft[idx], distil.kd_alpha, distil.kd_temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    train_s = time.perf_counter() - t0
    work_dir.mkdir(parents=True, exist_ok=True)
    fp32 = export_cloud_onnx(student, work_dir / f"minilm{layers}l_fp32.onnx")
    int8 = quantize_dynamic_int8(fp32, work_dir / f"minilm{layers}l_int8_pc.onnx", per_channel=True)
    tok_path = save_tokenizer(tokenizer, work_dir / "tokenizer.json", max_length)
    measured: dict[str, VariantMeasurement] = {}
    # Measured as the built edge is served: through the model set's spelling vocabulary, where it has one.
    spelling = None if manifest.spelling is None else model_dir / manifest.spelling.path
    for name, path in (("fp32", fp32), (SERVED_VARIANT, int8)):
        model = CloudModel.from_files(path, tok_path, labels, max_length, spelling_path=spelling)
        try:
            measured[name] = measure_variant(model, path, val.texts, val.y, LATENCY_SAMPLES)
        finally:
            model.close()
    served = measured[SERVED_VARIANT]
    temperature = fit_temperature(served.logits, val.y)
    escalation, _ = least_escalation_at_floor(served.logits, temperature, val.y, cloud_right_val, QUALITY_FLOOR)
    result = {
        **alternative_row(
            f"minilm-first-{layers}-layers-distilled",
            measured,
            SERVED_VARIANT,
            escalation,
            within_edge_bounds(served.bytes, served.batch1_latency_ms["p50"]),
            round(train_s, 1),
            chosen=False,
            extra={
                "teacher_soft_label_seconds": round(teacher_s, 1),
                "epochs": epochs,
                "teacher": f"cloud {teacher_output}",
            },
        ),
        "note": "measured after the build; uses the cloud ONNX interface (tokenizer + input_ids/attention_mask)",
    }
    logger.info("truncated MiniLM alternative: %s (%.0f s)", json.dumps(result), time.perf_counter() - started)
    if record:
        manifest = load_manifest(model_dir, verify=False)
        others = [a for a in manifest.metrics.get("edge_alternatives", []) if a["name"] != result["name"]]
        metrics = {**manifest.metrics, "edge_alternatives": [*others, result]}
        write_manifest(model_dir, replace(manifest, metrics=metrics))
    shutil.rmtree(work_dir, ignore_errors=True)
    return result
