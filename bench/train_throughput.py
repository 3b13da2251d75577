"""Training-step images/s and tokens/s: the demo-size NaViT-CLIP vs open_clip's CLIP, same run, CPU.

Both models: vision width 128, depth 4, 4 heads, MLP ratio 3; text width 128, depth 2, 4 heads,
context 24; embed 128; AdamW; the softmax CLIP loss. open_clip's ViT sees 224 x 224 images
(RandomResizedCrop, its training transform); ours sees packed 4 x 1024-token sequences with the
paper's recipe: longer side ~ U(64, 448) (about 224 x 224 pixels on average) and Beta token
dropping with mean rate 0.5 (`recipe`), or the same without dropping (`nodrop`). Both read the
demo shards; batches are loaded before the clock starts, so this times the training step alone
(bench/loader.py times the data side). Steps alternate between the models.

    python bench/train_throughput.py     -> bench/results/train_throughput.json
"""

import time

import open_clip
import torch
import webdataset as wds
from common import save_results
from open_clip.loss import ClipLoss
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from navit_clip.config import load_config
from navit_clip.data.demo import ensure_demo_data
from navit_clip.data.pipeline import PackedImageText
from navit_clip.loss import ContrastiveLoss
from navit_clip.model.clip import NaViTCLIP
from navit_clip.packing import ResolutionPolicy, TokenDropConfig
from navit_clip.tokenizer import build_tokenizer

SEQ_LEN, NUM_SEQS, MAX_IMAGES, MAX_SIDE = 1024, 4, 64, 448
BATCHES, WARMUP, REPEATS = 4, 2, 8


def our_setup(shards: str, drop: bool):
    cfg = load_config(
        "configs/demo.yaml",
        [
            "demo=false",
            f"data.shards={shards}",
            f"model.vision.seq_len={SEQ_LEN}",
            f"model.vision.max_images={MAX_IMAGES}",
            f"data.batch_seqs={NUM_SEQS}",
        ],
    )
    cfg.data.resolution = ResolutionPolicy("side_sampling", 64, MAX_SIDE, "uniform")
    cfg.data.token_drop = TokenDropConfig("beta", rate=0.5, d_max=0.9) if drop else TokenDropConfig("none")
    cfg.data.shuffle_buffer = 0
    tok = build_tokenizer("openclip", context_length=cfg.tokenizer.context_length)
    cfg.model.text.vocab_size, cfg.model.text.pad_id = tok.num_embeddings, tok.pad_id
    torch.manual_seed(0)
    model = NaViTCLIP(cfg.model)
    stream = iter(PackedImageText(cfg.data, tok))
    batches = [next(stream).to("cpu") for _ in range(BATCHES)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = ContrastiveLoss("softmax")

    def step(batch):
        opt.zero_grad(set_to_none=True)
        out = model(batch.images, batch.text)
        loss_fn(out["image_emb"], out["text_emb"], out["valid"], out["logit_scale"]).backward()
        opt.step()
        return batch.stats["images"], batch.stats["tokens"]

    return model, batches, step


def peer_setup(shards: str, n_images: int):
    vision = CLIPVisionCfg(layers=4, width=128, head_width=32, mlp_ratio=3.0, patch_size=16, image_size=224)
    text = CLIPTextCfg(context_length=24, width=128, heads=4, layers=2, mlp_ratio=3.0)
    torch.manual_seed(0)
    model = CLIP(embed_dim=128, vision_cfg=vision, text_cfg=text)
    transform = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=24)
    ds = (
        wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg;png", "txt")
    )
    ds = ds.map_tuple(transform, lambda t: t).batched(n_images)
    batches = []
    for images, texts in ds:
        batches.append((images, tokenizer(list(texts))))
        if len(batches) == BATCHES:
            break
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = ClipLoss()

    def step(batch):
        images, texts = batch
        opt.zero_grad(set_to_none=True)
        img, txt, scale = model(images, texts)
        loss_fn(img, txt, scale).backward()
        opt.step()
        return images.shape[0], images.shape[0] * 197

    return model, batches, step


def measure(setups: dict) -> dict:
    done = {k: [0, 0, 0.0] for k in setups}  # images, tokens, seconds
    for i in range(WARMUP + REPEATS):
        for k, (_, batches, step) in setups.items():
            t0 = time.perf_counter()
            images, tokens = step(batches[i % len(batches)])
            dt = time.perf_counter() - t0
            if i >= WARMUP:
                done[k][0] += images
                done[k][1] += tokens
                done[k][2] += dt
    return {
        k: {"images_per_s": v[0] / v[2], "tokens_per_s": v[1] / v[2], "images_per_step": v[0] / REPEATS}
        for k, v in done.items()
    }


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    shards = ensure_demo_data()["train"]
    setups = {"recipe": our_setup(shards, drop=True), "nodrop": our_setup(shards, drop=False)}
    peer_images = round(NUM_SEQS * SEQ_LEN / 197)  # the same tokens per step as a packed batch
    setups["open_clip"] = peer_setup(shards, peer_images)
    r = measure(setups)
    results = {
        "seq_len": SEQ_LEN,
        "num_seqs": NUM_SEQS,
        "max_side": MAX_SIDE,
        "open_clip_batch": peer_images,
        "repeats": REPEATS,
        "threads": torch.get_num_threads(),
    }
    for k, v in r.items():
        for m, x in v.items():
            results[f"{m}_{k}"] = x
        print(
            f"{k:10s} {v['images_per_s']:7.1f} images/s {v['tokens_per_s']:8.0f} tokens/s "
            f"({v['images_per_step']:.1f} images/step)"
        )
    for k in ("recipe", "nodrop"):
        results[f"ratio_images_per_s_{k}"] = r[k]["images_per_s"] / r["open_clip"]["images_per_s"]
        results[f"ratio_tokens_per_s_{k}"] = r[k]["tokens_per_s"] / r["open_clip"]["tokens_per_s"]
        print(
            f"ratio {k} / open_clip: images/s {results[f'ratio_images_per_s_{k}']:.2f}x, "
            f"tokens/s {results[f'ratio_tokens_per_s_{k}']:.2f}x"
        )
    save_results("train_throughput", results)


if __name__ == "__main__":
    main()
