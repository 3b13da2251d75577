"""Pretrain a NaViT-CLIP model.

    python train_clip.py                                   # the demo: generated data, CPU, minutes
    python train_clip.py --config configs/b16.yaml data.shards='/data/laion-{00000..09999}.tar'
    torchrun --nproc-per-node 8 train_clip.py --config configs/b16.yaml
    python train_clip.py --config configs/demo.yaml --resume latest

Dotted overrides (section.key=value, values parsed as YAML) follow the options.
"""

import argparse
import logging

from navit_clip.config import load_config
from navit_clip.train import train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: the CPU demo)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    train(load_config(args.config, overrides))


if __name__ == "__main__":
    main()
