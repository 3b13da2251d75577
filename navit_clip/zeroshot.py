"""Zero-shot classification: classifier weights from class names x prompt templates, then top-k.

Evaluation over a webdataset whose samples carry a class label (DataConfig.label_key). Work is
sharded across ranks (each reads its own shards) and the counts are summed, so one process and
torchrun give the same figures.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from navit_clip.data.pipeline import DataConfig, PackedImageText, make_loader
from navit_clip.packing import ResolutionPolicy


@torch.no_grad()
def build_classifier(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """[D, C]: for each class, the normalised mean of its normalised prompt embeddings."""
    weights = []
    for name in classnames:
        ids = tokenizer([t.format(name) for t in templates]).to(device)
        emb = model.encode_text(ids, normalize=True).mean(0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights, dim=1)


def topk_correct(logits_NC: torch.Tensor, labels_N: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many rows have their label among the k highest logits, for each k."""
    k_max = min(max(ks), logits_NC.shape[1])
    pred = logits_NC.topk(k_max, dim=1).indices
    hit = pred == labels_N[:, None]
    return {k: int(hit[:, : min(k, k_max)].any(1).sum()) for k in ks}


@torch.no_grad()
def evaluate_zeroshot(
    model,
    classifier_DC: torch.Tensor,
    data_cfg: DataConfig,
    device,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (and per-class top-1) over a labelled webdataset, summed over ranks."""
    data_cfg.validate()
    ds = PackedImageText(data_cfg, tokenizer=None, rank=rank, world_size=world_size)
    C = classifier_DC.shape[1]
    counts = torch.zeros(3 + 2 * C, dtype=torch.float64)  # n, top1, top5, per-class n, per-class top1
    for batch in make_loader(ds, num_workers=num_workers):
        batch = batch.to(device)
        emb_BED, valid_BE = model.encode_packed(batch.images)
        logits = emb_BED[valid_BE].float() @ classifier_DC.float()
        labels = batch.labels[valid_BE]
        hits = topk_correct(logits, labels)
        counts[0] += labels.numel()
        counts[1] += hits[1]
        counts[2] += hits[5]
        correct = (logits.argmax(1) == labels).double().cpu()
        counts[3 : 3 + C] += torch.bincount(labels.cpu(), minlength=C).double()
        counts[3 + C :] += torch.bincount(labels.cpu(), weights=correct, minlength=C)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(counts)
    n = max(float(counts[0]), 1.0)
    per_class = (counts[3 + C :] / counts[3 : 3 + C].clamp(min=1)).tolist()
    return {
        "n": float(counts[0]),
        "top1": float(counts[1]) / n,
        "top5": float(counts[2]) / n,
        "mean_per_class_top1": sum(per_class) / C,
        "per_class_top1": per_class,
    }


def eval_data_config(
    train_data: DataConfig, shards: str, label_key: str, max_side: int, seq_len: int, batch_seqs: int
) -> DataConfig:
    """The eval pipeline: finite, unshuffled, native resolution (capped), no token dropping."""
    from navit_clip.packing import TokenDropConfig

    return replace(
        train_data,
        shards=shards,
        resampled=False,
        shuffle_buffer=0,
        label_key=label_key,
        resolution=ResolutionPolicy("native", max_side=max_side),
        token_drop=TokenDropConfig("none"),
        seq_len=seq_len or train_data.seq_len,
        batch_seqs=batch_seqs,
        pack_factor=1.0,
    )
