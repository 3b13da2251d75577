"""Pretrain a NaViT-CLIP model.

    python train_clip.py                                   # the demo: generated data, CPU, minutes
    python train_clip.py --config configs/b16.yaml data.shards='/data/laion-{00000..09999}.tar'
    torchrun --nproc-per-node 8 train_clip.py --config configs/b16.yaml
    python train_clip.py --config configs/demo.yaml --resume latest

Dotted overrides (section.key=value, values parsed as YAML) go before or after the options.
"""

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from navit_clip.config import load_config
from navit_clip.train import train

DEMO = Path(__file__).resolve().parent / "configs" / "demo.yaml"  # found from any working directory


def parse(argv: list[str] | None = None) -> tuple[str, list[str]]:
    """The command line -> (config file, overrides); README's commands are checked with it."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(DEMO), help="YAML config (default: the CPU demo)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the options
    return args.config, list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])


def main() -> None:
    config, overrides = parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config, overrides)
        cfg.validate()
        if cfg.data.shards:  # the demo makes its own when none are named
            cfg.data.check_files()
        if cfg.eval.shards:
            replace(cfg.data, shards=cfg.eval.shards).check_files("eval.shards")
    except ValueError as e:  # a config error: one line naming the field, not a traceback
        sys.exit(f"config error: {e}")
    train(cfg)


if __name__ == "__main__":
    main()
