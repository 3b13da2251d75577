"""Zero-shot classification and image-text retrieval, at native resolution or at token budgets.

Classifier weights come from class names x prompt templates (open_clip's convention) and are cached
per checkpoint and template set. Evaluation data are webdatasets with a class-label field, image
folders (ROOT/CLASS_NAME/IMAGE), or paired image-text shards for retrieval. Work is sharded across
ranks (each reads its own shards) and counts or embeddings are gathered, so one process and
torchrun give the same figures.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from navit_clip.data.pipeline import DataConfig, PackedImageText, make_loader
from navit_clip.packing import ResolutionPolicy, TokenDropConfig, build_packed_batch, policy_max_tokens


def load_names(spec: str, kind: str) -> list[str]:
    """Class names or templates: 'imagenet' / 'openai' / 'simple' (open_clip's lists) or a file, one per line."""
    from open_clip import zero_shot_metadata as meta

    if kind == "classnames" and spec == "imagenet":
        return list(meta.IMAGENET_CLASSNAMES)
    if kind == "templates" and spec in ("openai", "imagenet"):
        return [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
    if kind == "templates" and spec == "simple":
        return [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES]
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"{kind}={spec!r}: not a known list and no such file")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if kind == "templates" and not all("{}" in t for t in names):
        raise ValueError(f"every template in {path} needs a '{{}}' where the class name goes")
    return names


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def folder_classnames(folders: list[str], given: list[str] | None) -> list[str]:
    """Class names in the image folder's label order (its sorted class folders).

    Given names that match the folder names (ignoring case and `_` vs space) are put in folder order,
    whatever order the file lists them in. Given names that match none of the folders (ImageNet's
    wnid folders with a file of readable names) are taken to follow the sorted folder order, as that
    convention has it. A partial match, or a count that differs, is an error naming both orders.
    """
    if not given:
        return [f.replace("_", " ") for f in folders]
    by_name = {_norm(g): g for g in given}
    matched = [by_name.get(_norm(f)) for f in folders]
    if len(given) == len(folders) and all(matched):
        return matched
    if len(given) == len(folders) and not any(matched):
        return list(given)
    raise ValueError(
        f"--classnames does not match the class folders: the folders (labels 0..{len(folders) - 1}, "
        f"sorted) are {folders[:12]}{' ...' if len(folders) > 12 else ''}; the file lists "
        f"{given[:12]}{' ...' if len(given) > 12 else ''}. Name the classes as the folders are named "
        f"(any order), or list readable names in the folders' sorted order"
    )


def label_map(classnames: list[str], shown: int = 10) -> str:
    """`0=circle, 1=square, ...`: the label-to-name mapping an evaluation used."""
    head = ", ".join(f"{i}={n}" for i, n in enumerate(classnames[:shown]))
    return head + (f", ... ({len(classnames)} classes)" if len(classnames) > shown else "")


@torch.no_grad()
def build_classifier(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """[D, C]: for each class, the normalised mean of its normalised prompt embeddings."""
    weights = []
    for name in classnames:
        ids = tokenizer([t.format(name) for t in templates]).to(device)
        emb = model.encode_text(ids, normalize=True).mean(0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights, dim=1)


def indistinct_classes(
    classifier_DC: torch.Tensor, classnames: list[str], threshold: float = 0.99, rows: int = 1024
) -> str:
    """A note when some classes' prompt embeddings sit at cosine >= `threshold`: the text tower barely
    tells those names apart, so zero-shot among them is near chance whatever the images. Identical
    names (ImageNet's two "crane" classes) read 1.0; so do names new to a checkpoint's text tower
    (bench/NOTES.md, twentieth round: ten new class names at 0.999). Empty when every pair is apart.
    The cosines are read `rows` classes at a time (21k classes: never a C x C matrix), keeping a count
    and the three closest pairs."""
    W_DC = classifier_DC.float()
    C = W_DC.shape[1]
    count, closest = 0, []  # (cosine, class, class): the closest pairs of each block of rows
    for start in range(0, C, rows):
        cos_RC = W_DC[:, start : start + rows].T @ W_DC
        row_R = torch.arange(start, start + cos_RC.shape[0], device=cos_RC.device)
        cos_RC = cos_RC.masked_fill(
            torch.arange(C, device=cos_RC.device) <= row_R[:, None], -2.0
        )  # pairs once
        count += int((cos_RC >= threshold).sum())
        top = cos_RC.flatten().topk(min(3, cos_RC.numel()))
        closest += [(v, start + k // C, k % C) for v, k in zip(top.values.tolist(), top.indices.tolist())]
    if not count:
        return ""
    shown = ", ".join(
        f"{classnames[a]!r} / {classnames[b]!r} {v:.3f}" for v, a, b in sorted(closest)[::-1][:3]
    )
    return (
        f"note: {count} of {C * (C - 1) // 2} class pairs have prompt embeddings at cosine >= {threshold} "
        f"({shown}{', ...' if count > 3 else ''}): the text tower barely tells these names apart, so "
        "zero-shot among them is near chance; rename duplicated classes, or fine-tune on captions that "
        "use the names"
    )


def cached_classifier(
    model, tokenizer, classnames, templates, device, cache_dir: str | Path | None, key: str
):
    """build_classifier, cached on disk under `cache_dir` by (key, class names, templates)."""
    if not cache_dir:
        return build_classifier(model, tokenizer, classnames, templates, device)
    digest = hashlib.sha256(json.dumps([key, classnames, templates]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"classifier-{digest}.pt"
    if path.exists():
        return torch.load(path, map_location=device, weights_only=True)
    weights = build_classifier(model, tokenizer, classnames, templates, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(weights.cpu(), tmp)
    tmp.replace(path)
    return weights


def lockstep(batches, data_cfg: DataConfig, device, world_size: int):
    """Yield (batch, real) until *every* rank is out of batches (one small all_reduce per batch).

    Under FSDP2 each forward is a collective, but ranks read different shards and run out at different
    times: a rank that is done keeps calling the tower on an idle batch (one 1-patch image, its output
    dropped), `real` False. With world_size 1 it yields the batches as they come."""
    if world_size == 1 or not dist.is_initialized():
        yield from ((batch, True) for batch in batches)
        return
    idle = None
    for batch in itertools.chain(batches, itertools.repeat(None)):
        more = torch.tensor([int(batch is not None)], device=device)
        dist.all_reduce(more)
        if not int(more):
            return
        if batch is not None:
            yield batch, True
            continue
        if idle is None:
            C = data_cfg.patch_size**2 * 3
            one_patch = ([torch.zeros(1, C)], [torch.zeros(1, 2, dtype=torch.long)], [[0]])
            idle = build_packed_batch(*one_patch, data_cfg.seq_len, data_cfg.max_images, grids=[(1, 1)])
            idle = idle.to(device)
        yield idle, False


def topk_correct(
    logits_NC: torch.Tensor, labels_N: torch.Tensor, ks=(1, 5), candidate_labels: torch.Tensor | None = None
) -> dict[int, int]:
    """How many rows have their label among the k highest logits, for each k.

    Column c stands for label c, or for `candidate_labels[c]` where columns share labels.
    """
    k_max = min(max(ks), logits_NC.shape[1])
    pred = logits_NC.topk(k_max, dim=1).indices
    if candidate_labels is not None:
        pred = candidate_labels[pred]
    hit = pred == labels_N[:, None]
    return {k: int(hit[:, : min(k, k_max)].any(1).sum()) for k in ks}


def eval_data_config(
    base: DataConfig,
    shards: str,
    label_key: str = "cls",
    policy: ResolutionPolicy | None = None,
    seq_len: int = 0,
    batch_seqs: int = 8,
) -> DataConfig:
    """The eval pipeline: finite, unshuffled, no token dropping; native resolution unless a policy is given.

    Sequences are made long enough for the largest image the policy allows, so no image is shrunk
    to fit a sequence: evaluation sees exactly the size the policy asks for.
    """
    policy = policy or ResolutionPolicy("native", max_side=512)
    seq_len = max(seq_len or base.seq_len, policy_max_tokens(policy, base.patch_size))
    return replace(
        base,
        shards=shards,
        resampled=False,
        shuffle_buffer=0,
        label_key=label_key,
        resolution=policy,
        token_drop=TokenDropConfig("none"),
        seq_len=seq_len,
        batch_seqs=batch_seqs,
        pack_factor=1.0,
    )


@torch.no_grad()
def evaluate_zeroshot(
    model,
    classifier_DC: torch.Tensor,
    data_cfg: DataConfig,
    device,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    progress: str | None = None,
) -> dict:
    """Top-1 / top-5 / per-class top-1 over labelled data, summed over ranks; plus images/s and
    tokens per image of the image tower (forward time only). `progress`: a progress bar of this title
    (images read, on rank 0), for a command line; none in training, whose own bar is showing."""
    data_cfg.validate()
    ds = PackedImageText(data_cfg, tokenizer=None, rank=rank, world_size=world_size)
    C = classifier_DC.shape[1]
    counts = torch.zeros(
        5 + 2 * C, dtype=torch.float64
    )  # n, top1, top5, tokens, seconds, per-class n, per-class top1
    bar = _bar(progress, rank)
    for batch, real in lockstep(make_loader(ds, num_workers=num_workers), data_cfg, device, world_size):
        if not real:  # this rank is done; its peers are not (FSDP)
            model.encode_packed(batch)
            continue
        batch = batch.to(device)
        t0 = time.perf_counter()
        emb_BED, valid_BE = model.encode_packed(batch.images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        counts[4] += time.perf_counter() - t0
        logits = emb_BED[valid_BE].float() @ classifier_DC.float()
        labels = batch.labels[valid_BE]
        if labels.numel() and int(labels.max()) >= C:  # a host sync, once per eval batch
            raise ValueError(
                f"label {int(labels.max())} is out of range for {len(classifier_DC.T)} class names"
            )
        hits = topk_correct(logits, labels)
        counts[0] += labels.numel()
        counts[1] += hits[1]
        counts[2] += hits[5]
        counts[3] += batch.stats["tokens"]
        correct = (logits.argmax(1) == labels).double().cpu()
        counts[5 : 5 + C] += torch.bincount(labels.cpu(), minlength=C).double()
        counts[5 + C :] += torch.bincount(labels.cpu(), weights=correct, minlength=C)
        bar.update(labels.numel())
    bar.close()
    if world_size > 1 and dist.is_initialized():
        counts = counts.to(device)  # NCCL reduces GPU tensors only
        dist.all_reduce(counts)
        counts = counts.cpu()
    n = max(float(counts[0]), 1.0)
    per_class = (counts[5 + C :] / counts[5 : 5 + C].clamp(min=1)).tolist()
    present = counts[5 : 5 + C] > 0
    return {
        "n": float(counts[0]),
        "top1": float(counts[1]) / n,
        "top5": float(counts[2]) / n,
        "mean_per_class_top1": float(torch.tensor(per_class)[present].mean()) if present.any() else 0.0,
        "per_class_top1": per_class,
        "tokens_per_image": float(counts[3]) / n,
        "images_per_s": float(counts[0]) / max(float(counts[4]) / max(world_size, 1), 1e-9),
    }


@torch.no_grad()
def evaluate_retrieval(
    model,
    tokenizer,
    data_cfg: DataConfig,
    device,
    rank: int = 0,
    world_size: int = 1,
    ks=(1, 5, 10),
    progress: str | None = None,
) -> dict:
    """Image->text and text->image recall@k over image-caption shards.

    A sample's `txt` may hold several captions, one a line (clip_benchmark's retrieval shards: COCO's
    and Flickr30k's five an image); see `retrieval_recall` for how they and repeated captions count.
    `progress` as in `evaluate_zeroshot`.
    """
    data_cfg = replace(data_cfg, label_key="")
    data_cfg.validate()
    ds = PackedImageText(data_cfg, tokenizer=None, rank=rank, world_size=world_size)
    keys, imgs, txts, tokens, owner = [], [], [], [], []  # owner: each caption's image, in `keys`
    idle_text = tokenizer([""]).to(device)  # what a rank that is out of data encodes (see lockstep)
    bar = _bar(progress, rank)
    for batch, real in lockstep(make_loader(ds, num_workers=0), data_cfg, device, world_size):
        if not real:  # this rank is done; its peers are not (FSDP): both towers keep in step
            model.encode_packed(batch)
            model.encode_text(idle_text)
            continue
        batch = batch.to(device)
        emb_BED, valid_BE = model.encode_packed(batch.images)
        slots = [(b, e) for b, row in enumerate(valid_BE.tolist()) for e, ok in enumerate(row) if ok]
        lines = [[t.strip() for t in batch.captions[b][e].splitlines() if t.strip()] for b, e in slots]
        owner += [len(keys) + i for i, these in enumerate(lines) for _ in these]
        keys += [batch.keys[b][e] for b, e in slots]
        ids_MK = tokenizer([t for these in lines for t in these])
        imgs.append(emb_BED[valid_BE].float().cpu())
        tokens.append(ids_MK)
        txts.append(model.encode_text(ids_MK.to(device), normalize=True).float().cpu())  # one call a batch
        bar.update(len(slots))
    bar.close()
    parts = [(keys, imgs, txts, tokens, owner)]
    if world_size > 1 and dist.is_initialized():  # a rank may have read nothing: gather lists, then cat
        parts = [None] * world_size
        dist.all_gather_object(parts, (keys, imgs, txts, tokens, owner))
    offsets = list(itertools.accumulate((len(p[0]) for p in parts), initial=0))
    keys = [k for p in parts for k in p[0]]
    owner = torch.tensor([o + off for p, off in zip(parts, offsets) for o in p[4]], dtype=torch.long)
    imgs, txts, tokens = ([t for p in parts for t in p[i]] for i in (1, 2, 3))
    if not imgs:
        raise ValueError(f"no image-text pairs in {data_cfg.shards!r}: nothing to evaluate retrieval on")
    # one order for any number of ranks: images by sample key, captions by their image, then line
    order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)
    position = torch.empty_like(order).index_put_((order,), torch.arange(len(order)))
    image_M = position[owner]
    by_image = torch.argsort(image_M, stable=True)
    img = torch.cat(imgs)[order]
    txt, tok = torch.cat(txts)[by_image], torch.cat(tokens)[by_image]
    return retrieval_recall(img, txt, tok, image_M[by_image], ks)


def _bar(title: str | None, rank: int) -> tqdm:
    """An evaluation's progress bar, images read so far (the total of a stream of shards is unknown)."""
    return tqdm(desc=title, unit="img", disable=title is None or rank != 0, mininterval=1.0)


def retrieval_recall(
    img_ND: torch.Tensor,
    txt_MD: torch.Tensor,
    tokens_MK: torch.Tensor,
    image_M: torch.Tensor,
    ks=(1, 5, 10),
    chunk: int = 1024,
) -> dict:
    """Recall@k both ways: N images, M captions, caption m one of image `image_M[m]`'s.

    An image may have several captions (COCO's five), and web data repeats captions across images
    ("image", product titles, class-name captions). Counted the plain way, the copies of a caption
    tie and who wins a tie decides the figure, so it would change with the order of the samples or
    the number of ranks. Here each distinct caption (token ids) is one candidate, represented by its
    first copy: image->text asks, per image, whether any of its captions is among the k best distinct
    captions; text->image asks, per caption (every line of every image), whether any image that has
    that caption is among the k best images. With one distinct caption an image, this is the usual
    definition; with several, clip_benchmark's. Similarities are taken `chunk` queries at a time.
    """
    N, M = img_ND.shape[0], txt_MD.shape[0]
    caption_M = torch.unique(tokens_MK, dim=0, return_inverse=True)[1]
    U = int(caption_M.max()) + 1
    first_U = torch.full((U,), M).scatter_reduce(0, caption_M, torch.arange(M), "amin")
    txt_UD = txt_MD[first_U]
    pairs = torch.unique(image_M * U + caption_M)  # every (image, distinct caption), as image * U + caption
    out = {"n": float(N), "captions": float(M)}
    i2t = _recall_hits(img_ND, txt_UD, lambda q, c: q * U + c, pairs, ks, chunk)
    t2i = _recall_hits(txt_UD[caption_M], img_ND, lambda q, c: c * U + caption_M[q], pairs, ks, chunk)
    for name, hits, queries in (("image_to_text", i2t, N), ("text_to_image", t2i, M)):
        for k in ks:
            out[f"{name}_R@{k}"] = hits[k] / queries
    return out


def _recall_hits(query_QD, cand_CD, code, pairs: torch.Tensor, ks, chunk: int) -> dict[int, int]:
    """For each k, how many queries have a true pair among their k best candidates; `code(query
    indices [q, 1], candidate indices [q, k])` gives each (query, candidate)'s code in `pairs`."""
    k_max = min(max(ks), cand_CD.shape[0])
    hits = dict.fromkeys(ks, 0)
    for start in range(0, query_QD.shape[0], chunk):
        q = query_QD[start : start + chunk]
        best_qk = (q @ cand_CD.T).topk(k_max, dim=1).indices
        rows = torch.arange(start, start + q.shape[0])[:, None]
        hit_qk = torch.isin(code(rows, best_qk), pairs)
        for k in ks:
            hits[k] += int(hit_qk[:, : min(k, k_max)].any(1).sum())
    return hits


def plot_budgets(rows: list[dict], path: str | Path) -> None:
    """Accuracy against tokens per image and against images/s, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x_key in zip(axes, ("tokens_per_image", "images_per_s")):
        ordered = sorted(rows, key=lambda r: r[x_key])  # lines join neighbours on the x axis
        x = [r[x_key] for r in ordered]
        for key, style in (("top1", "o-"), ("top5", "s--")):
            ax.plot(x, [100 * r[key] for r in ordered], style, label=key)
        for r, xi in zip(ordered, x):
            ax.annotate(
                str(r["budget"]), (xi, 100 * r["top1"]), textcoords="offset points", xytext=(3, 3), fontsize=8
            )
    axes[0].set(xlabel="tokens per image", ylabel="zero-shot accuracy (%)", xscale="log")
    axes[1].set(xlabel="images / s (image tower forward)", ylabel="zero-shot accuracy (%)", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'budget':>8} {'tokens/img':>10} {'images/s':>9} {'top1':>7} {'top5':>7} {'n':>6}"]
    for r in rows:
        lines.append(
            f"{str(r['budget']):>8} {r['tokens_per_image']:10.1f} {r['images_per_s']:9.1f} "
            f"{100 * r['top1']:6.2f}% {100 * r['top5']:6.2f}% {int(r['n']):6d}"
        )
    return "\n".join(lines)
