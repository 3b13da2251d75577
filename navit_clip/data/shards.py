"""Write img2dataset-style webdataset shards (KEY.ext + KEY.txt [+ KEY.json]) with webdataset's writer.

Sources: a folder of images with caption sidecars (IMG.jpg + IMG.txt), or a CSV/TSV with a path
column and a caption column. Image bytes are stored as they are (no re-encoding).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from navit_clip.data.decode import IMAGE_EXTS

log = logging.getLogger(__name__)


def pairs_from_folder(folder: str | Path) -> Iterator[tuple[Path, str]]:
    """(image path, caption) for every image under `folder` that has a caption sidecar (IMG.txt)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower().lstrip(".") not in IMAGE_EXTS:
            continue
        sidecar = path.with_suffix(".txt")
        if not sidecar.exists():
            log.warning("no caption file %s; skipping %s", sidecar.name, path)
            continue
        yield path, sidecar.read_text(encoding="utf-8").strip()


def pairs_from_table(
    table: str | Path, path_column: str = "path", caption_column: str = "caption"
) -> Iterator[tuple[Path, str]]:
    """(image path, caption) rows of a CSV or TSV (by extension); relative paths are relative to the file."""
    table = Path(table)
    delimiter = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
    with table.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = {path_column, caption_column} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{table} lacks the column(s) {sorted(missing)}; it has {reader.fieldnames}")
        for row in reader:
            path = Path(row[path_column])
            yield (path if path.is_absolute() else table.parent / path), row[caption_column]


def in_order(shards: str):
    """webdataset's WebDataset over `shards`, read once in order (no shard shuffling). Its check that
    every shard yields a sample is off where the installed version has one (`empty_check`, webdataset
    0.2.87+; 0.2.86, the oldest we support and the one open_clip_train needs, has none)."""
    import inspect

    import webdataset as wds

    quiet = {"empty_check": False} if "empty_check" in inspect.signature(wds.WebDataset).parameters else {}
    return wds.WebDataset(shards, shardshuffle=False, **quiet)


def shard_writer(pattern: str, max_count: int):
    """webdataset's ShardWriter, with a whole-second mtime on every member.

    Its default stamps each member with `time.time()`, a float, which Python's tarfile can only store
    in a PAX extended header: one more header to write and, worse, to parse in Python for every member
    read back (about a third of a data worker's time on the demo's shards). Whole seconds fit the plain
    ustar header, and every tar reader reads the shards as before.
    """
    import webdataset as wds

    return wds.ShardWriter(pattern, maxcount=max_count, verbose=0, mtime=int(time.time()))


def write_shards(pairs, out_dir: str | Path, prefix: str = "shard", max_count: int = 10000) -> dict[str, int]:
    """Write (image path, caption) pairs to OUT_DIR/PREFIX-%06d.tar; returns counts written/skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    with shard_writer(str(out_dir / f"{prefix}-%06d.tar"), max_count) as sink:
        for i, (path, caption) in enumerate(pairs):
            ext = path.suffix.lower().lstrip(".")
            if ext not in IMAGE_EXTS or not path.exists():
                log.warning("skipping %s: missing or not one of %s", path, IMAGE_EXTS)
                skipped += 1
                continue
            sample = {
                "__key__": f"{i:09d}",
                ext: path.read_bytes(),
                "txt": caption,
                "json": json.dumps({"source": str(path)}),
            }
            sink.write(sample)
            written += 1
    return {"written": written, "skipped": skipped}
