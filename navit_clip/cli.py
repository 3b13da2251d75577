"""The `navit-clip` command. Subcommands are thin doors: parse arguments, call the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    import torch

    import navit_clip
    from navit_clip.model.attention import ATTN_BACKENDS, resolve_backend

    print(f"navit-clip {navit_clip.__version__}, torch {torch.__version__}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        with torch.no_grad():
            inference = {b: resolve_backend(b, torch.device(dev)) for b in ATTN_BACKENDS}
        training = {b: resolve_backend(b, torch.device(dev)) for b in ATTN_BACKENDS}
        print(f"{dev}: attention backend -> used for training / inference")
        for b in ATTN_BACKENDS:
            print(f"  {b:8s} -> {training[b]} / {inference[b]}")
    return 0


def _make_shards(args: argparse.Namespace) -> int:
    from navit_clip.data.shards import pairs_from_folder, pairs_from_table, write_shards

    src = Path(args.source)
    pairs = (
        pairs_from_folder(src)
        if src.is_dir()
        else pairs_from_table(src, args.path_column, args.caption_column)
    )
    counts = write_shards(pairs, args.out_dir, args.prefix, args.max_count)
    print(
        f"wrote {counts['written']} samples to {args.out_dir}/{args.prefix}-*.tar ({counts['skipped']} skipped)"
    )
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from navit_clip.data.pipeline import DataConfig, PackedImageText, make_loader
    from navit_clip.packing import ResolutionPolicy, TokenDropConfig

    cfg = DataConfig(
        shards="::".join(args.shards),
        patch_size=args.patch_size,
        seq_len=args.seq_len,
        max_images=args.max_images,
        batch_seqs=args.batch_seqs,
        resampled=False,
        num_workers=args.workers,
        resolution=ResolutionPolicy(args.resolution, max_side=args.max_side),
        token_drop=TokenDropConfig("beta" if args.drop_rate > 0 else "none", rate=args.drop_rate),
    )
    totals: dict[str, float] = {}
    batches = 0
    t0 = time.perf_counter()
    for batch in tqdm(make_loader(PackedImageText(cfg)), desc="batches", unit="batch"):
        batches += 1
        for k, v in batch.stats.items():
            totals[k] = totals.get(k, 0) + v
        if args.max_batches and batches >= args.max_batches:
            break
    dt = time.perf_counter() - t0
    if batches == 0:
        print(
            "no batch was made: no usable sample in the shards (the skips are counted in the warnings above)"
        )
        return 1
    slots = batches * cfg.batch_seqs * cfg.seq_len
    print(f"batches {batches}, images {int(totals.get('images', 0))}, {dt:.1f} s")
    print(f"padding fraction {1 - totals.get('tokens', 0) / max(slots, 1):.4f}")
    print(f"images per sequence {totals.get('images', 0) / max(batches * cfg.batch_seqs, 1):.2f}")
    print(f"images/s {totals.get('images', 0) / dt:.1f}, tokens/s {totals.get('tokens', 0) / dt:.0f}")
    dropped = totals.get("tokens_dropped", 0)
    print(f"tokens dropped {dropped / max(dropped + totals.get('tokens', 0), 1):.3f}")
    for k in sorted(totals):
        if k.startswith("skip_") or k == "corrupt_shard":
            print(f"{k}: {int(totals[k])}")
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from navit_clip.data.decode import BadSample, find_caption
    from navit_clip.data.shards import in_order
    from navit_clip.tokenizer import train_sentencepiece

    def captions():
        n = 0
        for shards in args.shards:
            for sample in in_order(shards):
                try:
                    yield find_caption(sample)
                except BadSample:
                    continue
                n += 1
                if args.max_captions and n >= args.max_captions:
                    return

    path = train_sentencepiece(captions(), args.out, args.vocab_size)
    print(f"wrote {path}; use it with tokenizer.kind=sentencepiece tokenizer.path={path}")
    return 0


def _eval_classnames(args: argparse.Namespace) -> list[str]:
    """The class names of `--data`: folders matched to `--classnames` by name, or the file for shards."""
    from navit_clip.data.pipeline import folder_classes
    from navit_clip.zeroshot import folder_classnames, load_names

    given = load_names(args.classnames, "classnames") if args.classnames else None
    if Path(args.data).is_dir():
        return folder_classnames(folder_classes(args.data), given)
    return given


def _eval_zeroshot(args, cfg, model, tokenizer, info, budgets: list[str]) -> tuple[list[str], list[dict]]:
    """Zero-shot top-1/top-5 of `--data` at each budget ('native' or tokens per image)."""
    from navit_clip.packing import ResolutionPolicy
    from navit_clip.zeroshot import (
        cached_classifier,
        eval_data_config,
        evaluate_zeroshot,
        indistinct_classes,
        label_map,
        load_names,
    )

    classnames = _eval_classnames(args)
    if info.is_main:
        source = "sorted class folders" if Path(args.data).is_dir() else args.label_key
        print(f"labels ({source}): {label_map(classnames)}")
    ckpt = Path(args.checkpoint)
    classifier = cached_classifier(
        model,
        tokenizer,
        classnames,
        load_names(args.templates, "templates"),
        info.device,
        ckpt.parent / "zeroshot_cache",
        str(ckpt.resolve()),
    )
    note = indistinct_classes(classifier, classnames)
    if note and info.is_main:
        print(note)
    rows = []
    for b in budgets:
        policy = (
            ResolutionPolicy("native", max_side=args.max_side)
            if b == "native"
            else ResolutionPolicy("budget", tokens=int(b))
        )
        data_cfg = eval_data_config(cfg.data, args.data, args.label_key, policy, 0, args.batch_seqs)
        r = evaluate_zeroshot(
            model, classifier, data_cfg, info.device, info.rank, info.world_size, progress=f"zero-shot @ {b}"
        )
        if not r["n"]:  # the same on every rank (summed)
            raise ValueError(
                f"no labelled image read from --data {args.data}: every sample was skipped (not an "
                f"image, unreadable, or no '{args.label_key}' label)"
            )
        rows.append({**r, "budget": b})
    return classnames, rows


def _budget_list(text: str) -> list[str]:
    """--budgets: a comma list of 'native' and positive token counts (checked as the line is parsed)."""
    budgets = [b.strip() for b in text.split(",") if b.strip()]
    for b in budgets:
        if b != "native" and not (b.isdigit() and int(b) > 0):
            raise argparse.ArgumentTypeError(f"entry {b!r} must be 'native' or a positive token count")
    if not budgets:
        raise argparse.ArgumentTypeError("no budget given")
    return budgets


def _past_trained_sizes(cfg, budgets: list[str]) -> str:
    """A note when some budgets give images larger than any the checkpoint trained on."""
    from navit_clip.config import trained_side

    side = trained_side(cfg.data.resolution, cfg.model.vision.patch_size)
    past = [b for b in budgets if b.isdigit() and int(b) > side * side]
    if not past:
        return ""
    return (
        f"note: at {', '.join(past)} tokens per image the images are larger than any trained "
        f"(longest trained side {side} patches, a {side * side}-token square): accuracy usually falls "
        f"there; train with a larger data.resolution.max_side for those budgets"
    )


def _check_eval_inputs(args: argparse.Namespace) -> None:
    """What `navit-clip eval` was given, checked before a checkpoint is read or a process group set up:
    a ValueError naming the argument (one line, from `main`)."""
    from navit_clip.data.pipeline import DataConfig, folder_classes

    if not Path(args.checkpoint).exists():
        raise ValueError(f"checkpoint {args.checkpoint} does not exist")
    if not args.data and not args.retrieval:
        raise ValueError("nothing to evaluate: give --data (zero-shot) and/or --retrieval")
    if args.data and Path(args.data).is_dir():
        if not folder_classes(args.data):
            raise ValueError(
                f"--data {args.data}: no class folders; an image folder is ROOT/CLASS_NAME/IMAGE "
                "(labels from the sorted class folders)"
            )
    elif args.data:
        if not any(c in args.data for c in "{:") and not Path(args.data).exists():
            raise ValueError(f"--data {args.data} does not exist (an image folder or labelled shards)")
        if not args.classnames:
            raise ValueError(f"--data {args.data}: shards need --classnames (a file, or 'imagenet')")
        DataConfig(shards=args.data).check_files("--data")
    if args.retrieval and Path(args.retrieval).is_dir():
        raise ValueError(
            f"--retrieval {args.retrieval} is a folder; retrieval reads image-text shards: make them from "
            "IMAGE + IMAGE.txt pairs with `navit-clip make-shards`"
        )
    if args.retrieval:
        DataConfig(shards=args.retrieval).check_files("--retrieval")


def _eval(args: argparse.Namespace) -> int:
    import json

    from navit_clip.distributed import init_distributed
    from navit_clip.factory import config_of, create_model, get_tokenizer
    from navit_clip.packing import ResolutionPolicy
    from navit_clip.zeroshot import eval_data_config, evaluate_retrieval, format_table, plot_budgets

    _check_eval_inputs(args)
    budgets = args.budgets
    info = init_distributed(args.device)
    cfg = config_of(args.checkpoint)
    model = create_model(args.checkpoint, info.device)
    tokenizer = get_tokenizer(args.checkpoint, args.tokenizer)
    out = Path(args.out or Path(args.checkpoint).parent / "eval")
    results: dict = {"checkpoint": str(args.checkpoint)}
    if args.data:
        results["labels"], results["zeroshot"] = _eval_zeroshot(args, cfg, model, tokenizer, info, budgets)
        if info.is_main:
            print(format_table(results["zeroshot"]))
            if note := _past_trained_sizes(cfg, budgets):
                print(note)
    if args.retrieval:
        policy = ResolutionPolicy("native", max_side=args.max_side)
        data_cfg = eval_data_config(cfg.data, args.retrieval, "", policy, 0, args.batch_seqs)
        r = evaluate_retrieval(
            model, tokenizer, data_cfg, info.device, info.rank, info.world_size, progress="retrieval"
        )
        results["retrieval"] = r
        if info.is_main:
            print("retrieval: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r.items() if "@" in k))
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        written = [out / "results.json"]
        if results.get("zeroshot"):
            plot_budgets(results["zeroshot"], out / "accuracy_vs_tokens.png")
            written.append(out / "accuracy_vs_tokens.png")
        print("wrote " + " and ".join(map(str, written)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from navit_clip.export import export_encoder

    if args.format == "hf":
        from navit_clip.convert.hf import export_hf

        out = export_hf(args.checkpoint, args.out_dir, with_text=args.with_text, max_tokens=args.max_tokens)
        print(
            f"exported to {out} (transformers' own classes, no remote code): "
            + ", ".join(sorted(p.name for p in out.iterdir()))
        )
        return 0
    out = export_encoder(
        args.checkpoint,
        args.out_dir,
        with_text=args.with_text,
        onnx=not args.no_onnx,
        max_tokens=args.max_tokens,
    )
    print(f"exported to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def _convert_openclip(args: argparse.Namespace) -> int:
    from navit_clip.convert import convert_openclip
    from navit_clip.convert.hf import convert_hf, is_hf_folder

    if is_hf_folder(args.model):
        if args.pretrained or args.tokenizer:
            raise ValueError(
                f"{args.model} is a transformers folder: its weights and tokenizer are read from it "
                "(--pretrained and --tokenizer are for open_clip models)"
            )
        out, fresh_text = convert_hf(args.model, args.out)
        if fresh_text:
            print(
                f"{args.model} is a vision tower alone: the checkpoint's text tower is navit-clip's default, fresh"
            )
    else:
        out = convert_openclip(args.model, args.pretrained, args.out, args.tokenizer)
    print(
        f"wrote {out}: evaluate it with `navit-clip eval {out} --data ...`, export it with "
        f"`navit-clip export {out} DIR`, fine-tune it with `python train_clip.py --config "
        f"configs/finetune_openclip.yaml model.init_from={out} data.shards=...`"
    )
    return 0


def _wise_ft(args: argparse.Namespace) -> int:
    from navit_clip.wiseft import wise_ft

    out = wise_ft(args.start, args.finetuned, args.out, args.alpha)
    print(f"wrote {out} = {1 - args.alpha:g} x {args.start} + {args.alpha:g} x {args.finetuned}")
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from navit_clip.checkpoint import consolidate

    if not Path(args.step_dir).is_dir():
        raise ValueError(f"{args.step_dir} is no step folder (a sharded checkpoint is a folder step_N/)")
    out = consolidate(args.step_dir, args.out)
    print(f"wrote {out}: every command and train.resume read it as any one-file checkpoint")
    return 0


def _data_parsers(sub) -> None:
    p = sub.add_parser("make-shards", help="write webdataset shards from an image folder or a CSV/TSV")
    p.add_argument("source", help="folder of IMG.ext + IMG.txt, or a .csv/.tsv with path and caption columns")
    p.add_argument("out_dir")
    p.add_argument("--prefix", default="shard")
    p.add_argument("--max-count", type=int, default=10000, help="samples per shard")
    p.add_argument("--path-column", default="path")
    p.add_argument("--caption-column", default="caption")
    p.set_defaults(fn=_make_shards)

    p = sub.add_parser("data-stats", help="padding, images per sequence, skips and loader throughput")
    p.add_argument("shards", nargs="+", help="shard paths or brace patterns")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-images", type=int, default=16)
    p.add_argument("--batch-seqs", type=int, default=8)
    p.add_argument("--resolution", default="native", choices=["native", "side_sampling"])
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--drop-rate", type=float, default=0.0, help="mean Beta token-drop rate (0: none)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-batches", type=int, default=0)
    p.set_defaults(fn=_data_stats)

    p = sub.add_parser("train-tokenizer", help="train a SentencePiece model on the captions of shards")
    p.add_argument("shards", nargs="+")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--max-captions", type=int, default=0, help="stop after this many captions (0: all)")
    p.set_defaults(fn=_train_tokenizer)


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="zero-shot classification (and retrieval) of a checkpoint, at token budgets"
    )
    p.add_argument("checkpoint")
    p.add_argument("--data", help="labelled shards (KEY.cls) or an image folder ROOT/CLASS_NAME/IMAGE")
    p.add_argument(
        "--classnames",
        default="",
        help="a file (one per line) or 'imagenet'; folders default to their class folders",
    )
    p.add_argument("--templates", default="openai", help="a file with '{}' templates, 'openai' or 'simple'")
    p.add_argument("--label-key", default="cls")
    p.add_argument(
        "--budgets",
        default=["native"],
        type=_budget_list,
        help="comma list of 'native' and tokens per image, e.g. native,64,256,1024",
    )
    p.add_argument("--max-side", type=int, default=512, help="longer-side cap at native resolution")
    p.add_argument("--retrieval", default="", help="paired image-text shards for recall@1/5/10")
    p.add_argument("--batch-seqs", type=int, default=8)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="", help="output folder (default: CHECKPOINT_FOLDER/eval)")
    p.add_argument(
        "--tokenizer", default="", help="the checkpoint's tokenizer file or folder, where it names none here"
    )
    p.set_defaults(fn=_eval)


def _checkpoint_parsers(sub) -> None:
    """The commands that turn one checkpoint into another artefact: export, convert (convert-openclip),
    wise-ft, consolidate."""
    p = sub.add_parser(
        "export", help="export the image encoder for VLMs (safetensors, torch-only module, HF, ONNX)"
    )
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--with-text", action="store_true", help="also write the text tower's weights and config")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument(
        "--max-tokens", type=int, default=256, help="the processor's default token budget per image"
    )
    p.add_argument(
        "--format",
        default="navit",
        choices=["navit", "hf"],
        help="navit: navit-clip's own encoder (every tower; torch-only module, remote-code AutoModel, ONNX); "
        "hf: transformers' own CLIP / SigLIP / SigLIP2 classes, no remote code (towers of that shape)",
    )
    p.set_defaults(fn=_export)

    for name in ("convert", "convert-openclip"):
        _convert_parser(sub, name)

    p = sub.add_parser(
        "wise-ft", help="weight-space ensemble of a fine-tuned checkpoint with its start (WiSE-FT)"
    )
    p.add_argument("start", help="the checkpoint the fine-tune started from (e.g. a converted one)")
    p.add_argument("finetuned", help="the fine-tuned checkpoint")
    p.add_argument("out", help="the checkpoint to write (.pt)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the fine-tuned model, 0..1")
    p.set_defaults(fn=_wise_ft)

    p = sub.add_parser(
        "consolidate",
        help="a sharded checkpoint's step folder (train.checkpoint_format=sharded) -> one .pt file",
    )
    p.add_argument("step_dir", help="the step folder, e.g. runs/demo/step_00001000")
    p.add_argument("out", help="the one-file checkpoint to write (.pt): model, optimizer, schedule, state")
    p.set_defaults(fn=_consolidate)


def _convert_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="a transformers folder (CLIP, SigLIP, SigLIP2 / NaFlex: whole or vision tower) or an open_clip "
        "checkpoint (its ViTs, timm ViT / NaFlexViT towers) -> a navit-clip checkpoint computing the same "
        "embeddings" + (" (alias of convert)" if name != "convert" else ""),
    )
    p.add_argument(
        "model",
        help="a local transformers folder (config.json + weights), or an open_clip model name "
        "(ViT-B-32, ViT-B-16-SigLIP2, ...) or its config .json",
    )
    p.add_argument(
        "--pretrained",
        default="",
        help="the checkpoint file (.safetensors, .bin, .pt); none: random weights (for tests)",
    )
    p.add_argument("out", help="the navit-clip checkpoint to write (.pt)")
    p.add_argument(
        "--tokenizer",
        default="",
        help="the model's tokenizer where it is not open_clip's BPE: a local Hugging Face folder, "
        "tokenizer.json or SentencePiece .model (optional: train and eval can name it later)",
    )
    p.set_defaults(fn=_convert_openclip)


def build_parser() -> argparse.ArgumentParser:
    """The `navit-clip` command line, every subcommand (tests parse the commands of README.md and docs/ with it)."""
    parser = argparse.ArgumentParser(prog="navit-clip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions and which attention backend runs where")
    p.set_defaults(fn=_info)
    _data_parsers(sub)
    _eval_parser(sub)
    _checkpoint_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line (NAVIT_CLIP_TRACEBACK=1: the trace)
        if os.environ.get("NAVIT_CLIP_TRACEBACK"):
            raise
        print(f"navit-clip {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
