"""Which samples of a finite epoch have been consumed: what lets finite data resume on another world size.

Finite data (`data.resampled=false`) splits its shards across ranks by index, so a run resumed on
another number of ranks reads each shard on another rank, in another order. Replaying the old ranks'
streams cannot position the new ones; naming what was consumed can. Every sample is named by its
source and its index there (a shard's URL and the sample's position in the tar, or an image folder
and the file's position in its sorted listing), which is the same on every read of the same files.
Each rank records the samples of the batches its trainer took (not those prefetched: the batches in
flight at a save are read again), the ranks' records are merged at a save, and a run resumed on
another world size drops the consumed samples of each epoch before they are decoded.

Indices are kept as sorted half-open ranges per source: a shard read whole is one range, a shuffle
buffer's holes a few more, so the record of an epoch of any size stays small.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

SampleId = tuple[str, int]  # (source: shard URL or image folder, index of the sample in it)


class ConsumedSamples:
    """A set of SampleIds stored as disjoint sorted half-open ranges per source."""

    def __init__(self, ranges: dict[str, list[list[int]]] | None = None):
        self.ranges: dict[str, list[list[int]]] = {}
        for source, spans in (ranges or {}).items():
            for a, b in spans:
                self.add_range(source, a, b)

    def __len__(self) -> int:
        return sum(b - a for spans in self.ranges.values() for a, b in spans)

    def __contains__(self, sample: SampleId) -> bool:
        source, i = sample
        spans = self.ranges.get(source)
        if not spans:
            return False
        k = bisect.bisect_right(spans, [i, float("inf")]) - 1
        return k >= 0 and spans[k][0] <= i < spans[k][1]

    def add(self, sample: SampleId) -> None:
        self.add_range(sample[0], sample[1], sample[1] + 1)

    def update(self, samples: Iterable[SampleId]) -> None:
        for s in samples:
            self.add(s)

    def add_range(self, source: str, a: int, b: int) -> None:
        """Add indices a .. b-1 of `source`, merging with the ranges they touch."""
        if b <= a:
            return
        spans = self.ranges.setdefault(source, [])
        lo = bisect.bisect_left(spans, [a, a])
        if lo > 0 and spans[lo - 1][1] >= a:  # the range before reaches a
            lo -= 1
        hi = lo
        while hi < len(spans) and spans[hi][0] <= b:
            hi += 1
        if hi > lo:
            a, b = min(a, spans[lo][0]), max(b, spans[hi - 1][1])
        spans[lo:hi] = [[a, b]]

    def merge(self, other: ConsumedSamples) -> ConsumedSamples:
        for source, spans in other.ranges.items():
            for a, b in spans:
                self.add_range(source, a, b)
        return self

    def state(self) -> dict[str, list[list[int]]]:
        """Plain lists (a checkpoint stores them with torch.save's weights_only loader)."""
        return {source: [list(s) for s in spans] for source, spans in self.ranges.items()}


class EpochRecord:
    """One rank's consumed samples of every epoch it has not yet seen all ranks finish (finite data).

    `epochs` maps an epoch to its ConsumedSamples. A save merges every rank's record (`merged`) and
    keeps the epochs from the slowest rank's on: those older every rank has read whole."""

    def __init__(self, epochs: dict[int, ConsumedSamples] | None = None):
        self.epochs: dict[int, ConsumedSamples] = dict(epochs or {})

    def record(self, epoch: int, samples: Iterable[SampleId]) -> None:
        self.epochs.setdefault(epoch, ConsumedSamples()).update(samples)

    def state(self) -> dict[int, dict]:
        return {e: c.state() for e, c in self.epochs.items()}

    def drop_before(self, epoch: int) -> None:
        self.epochs = {e: c for e, c in self.epochs.items() if e >= epoch}

    @classmethod
    def from_state(cls, state: dict | None) -> EpochRecord:
        return cls({int(e): ConsumedSamples(r) for e, r in (state or {}).items()})

    @staticmethod
    def merged(records: list[tuple[int, dict]]) -> dict:
        """Every rank's (current epoch, record state) -> the state a resume reads: `epoch`, the
        slowest rank's (where a resumed stream begins), and `consumed`, the union of what any rank
        took of that epoch and of each later one."""
        first = min(e for e, _ in records)
        union: dict[int, ConsumedSamples] = {}
        for _, state in records:
            for e, c in EpochRecord.from_state(state).epochs.items():
                if e >= first:
                    union.setdefault(e, ConsumedSamples()).merge(c)
        return {"epoch": first, "consumed": {e: c.state() for e, c in sorted(union.items())}}


def sample_id(sample: dict) -> SampleId:
    return sample.get("__url__", ""), sample.get("__index__", -1)


def drop_consumed(samples: Iterator[dict], consumed: ConsumedSamples) -> Iterator[dict]:
    """A webdataset stage: the samples not in `consumed`, dropped before anything is decoded."""
    return (s for s in samples if sample_id(s) not in consumed)


def number_samples(samples: Iterator[dict]) -> Iterator[dict]:
    """A webdataset stage after tarfile_to_samples: each sample's position in its shard ("__index__"),
    the same on every read of the same file."""
    seen: dict[str, int] = {}
    for sample in samples:
        url = sample.get("__url__", "")
        sample["__index__"] = seen.get(url, 0)
        seen[url] = sample["__index__"] + 1
        yield sample
