"""The webdataset pipeline on shards built here: delivery, bad samples, sizes, dropping, shapes."""

import io
import random
import tarfile

import pytest
import torch
import webdataset as wds
from PIL import Image

from navit_clip.config import trained_side
from navit_clip.data.consumed import ConsumedSamples, EpochRecord
from navit_clip.data.decode import BadSample, decode_image
from navit_clip.data.pipeline import DataConfig, PackedImageText, make_loader
from navit_clip.data.shards import pairs_from_folder, pairs_from_table, write_shards
from navit_clip.model.clip import CLIP_MEAN, CLIP_STD
from navit_clip.packing import (
    ResolutionPolicy,
    TokenDropConfig,
    policy_max_tokens,
    sample_drop_rate,
    target_size,
)

P = 16


def encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def good_image(rng: random.Random) -> bytes:
    W, H = rng.randint(20, 200), rng.randint(20, 200)
    return encode(Image.new("RGB", (W, H), tuple(rng.randint(0, 255) for _ in range(3))), "JPEG")


BAD = {
    "undecodable": {"jpg": b"this is not a jpeg", "txt": "broken"},
    "no_caption": {"jpg": None, "txt": "   "},
    "no_image": {"txt": "a caption without an image"},
    "empty_image": {"png": b"", "txt": "empty file"},
    "aspect_ratio": {"png": encode(Image.new("RGB", (1000, 10))), "txt": "a line"},
    "too_many_pixels": {"png": encode(Image.new("L", (1500, 1000))), "txt": "huge"},
}
MAX_PIXELS = 1_000_000


def write_corpus(root, n_shards=4, per_shard=12, bad_every=5):
    """Shards with good samples and every kind of bad one; returns (patterns, good keys, bad counts)."""
    rng = random.Random(0)
    good, bad_counts, i = set(), {k: 0 for k in BAD}, 0
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"shard-{s:04d}.tar")) as sink:
            for _ in range(per_shard):
                key = f"s{i:05d}"
                i += 1
                if i % bad_every == 0:
                    reason = list(BAD)[(i // bad_every) % len(BAD)]
                    sample = {k: (good_image(rng) if v is None else v) for k, v in BAD[reason].items()}
                    bad_counts[reason] += 1
                else:
                    sample = {"jpg": good_image(rng), "txt": f"caption {key}"}
                    good.add(key)
                sink.write({"__key__": key, **sample})
    return str(root / f"shard-{{0000..{n_shards - 1:04d}}}.tar"), good, bad_counts


def config(shards, **kw):
    base = dict(
        shards=shards,
        patch_size=P,
        seq_len=64,
        max_images=4,
        batch_seqs=3,
        resampled=False,
        shuffle_buffer=10,
        max_pixels=MAX_PIXELS,
        max_aspect=20.0,
        num_workers=2,
        resolution=ResolutionPolicy("native", max_side=128),
    )
    base.update(kw)
    return DataConfig(**base)


def collect(ds, workers=2, limit=None):
    keys, stats, shapes = [], {}, set()
    for n, batch in enumerate(make_loader(ds, num_workers=workers)):
        imgs = batch.images
        shapes.add((tuple(imgs.patches.shape), tuple(imgs.slot_valid.shape), tuple(batch.text.shape)))
        for b in range(imgs.segment_ids.shape[0]):
            assert int((imgs.segment_ids[b] > 0).sum()) <= ds.cfg.seq_len
            assert int(imgs.slot_valid[b].sum()) <= ds.cfg.max_images
        keys += [k for row in batch.keys for k in row if k]
        for k, v in batch.stats.items():
            stats[k] = stats.get(k, 0) + v
        if limit and n + 1 >= limit:
            break
    return keys, stats, shapes


class ToyTokenizer:
    pad_id = 0

    def __call__(self, texts):
        return torch.tensor([[len(t), 1, 2] for t in texts])


toy_tokenizer = ToyTokenizer()


def test_finite_mode_delivers_every_valid_sample_once_across_ranks_and_workers(tmp_path):
    shards, good, bad_counts = write_corpus(tmp_path)
    keys, stats = [], {}
    for rank in range(2):
        ds = PackedImageText(config(shards), tokenizer=toy_tokenizer, rank=rank, world_size=2)
        k, s, shapes = collect(ds)
        keys += k
        for name, v in s.items():
            stats[name] = stats.get(name, 0) + v
        assert shapes == {((3, 64, P * P * 3), (3, 4), (3, 4, 3))}  # fixed shapes
    assert len(keys) == len(set(keys)) and set(keys) == good
    for reason, n in bad_counts.items():
        assert stats.get(f"skip_{reason}", 0) == n, (reason, stats)


def test_consumed_samples_are_the_set_of_their_indices():
    """The range record of navit_clip.data.consumed against a plain set, under random insertion."""
    rng = random.Random(0)
    got, want = ConsumedSamples(), set()
    for _ in range(2000):
        source, i = rng.choice("ab"), rng.randrange(300)
        if rng.random() < 0.1:  # a run of indices at once
            j = i + rng.randrange(1, 20)
            got.add_range(source, i, j)
            want |= {(source, x) for x in range(i, j)}
        else:
            got.add((source, i))
            want.add((source, i))
        assert len(got) == len(want)
    assert {(s, i) for s in "abc" for i in range(-2, 330) if (s, i) in got} == want
    for spans in got.ranges.values():  # disjoint, sorted, never touching
        assert all(a < b < c for (a, b), (c, _) in zip(spans, spans[1:]))
    assert ConsumedSamples(got.state()).ranges == got.ranges


def test_finite_data_resumed_on_another_world_reads_each_sample_of_the_epoch_once(tmp_path):
    """2 ranks take some batches of an epoch (2 workers each, bad samples and a shuffle buffer among
    them); 3 ranks read on without what the 2 consumed, their record merged as a checkpoint merges it:
    every good sample of the epoch is delivered exactly once over both, every bad one counted once."""
    shards, good, bad_counts = write_corpus(tmp_path, n_shards=5)
    keys, stats, records = [], {}, []

    def take(ds, limit=None):
        for n, batch in enumerate(make_loader(ds, num_workers=2)):
            if limit is not None and n >= limit:
                break  # the batches the loader prefetched past here are in flight: not consumed
            ds.record.record(ds.epoch, batch.ids)
            keys.extend(k for row in batch.keys for k in row if k)
            for name, v in batch.stats.items():
                stats[name] = stats.get(name, 0) + v

    for rank, limit in ((0, 3), (1, 2)):
        ds = PackedImageText(config(shards), tokenizer=toy_tokenizer, rank=rank, world_size=2)
        take(ds, limit)
        records.append((ds.epoch, ds.record.state()))
    merged = EpochRecord.merged(records)
    assert merged["epoch"] == 0 and 0 < len(ConsumedSamples(merged["consumed"][0])) < len(good)
    for rank in range(3):
        ds = PackedImageText(config(shards), tokenizer=toy_tokenizer, rank=rank, world_size=3)
        ds.consumed = {e: ConsumedSamples(r) for e, r in merged["consumed"].items()}
        take(ds)
    assert len(keys) == len(set(keys)) and set(keys) == good
    for reason, n in bad_counts.items():
        assert stats.get(f"skip_{reason}", 0) == n, (reason, stats)


def test_corrupt_shard_is_skipped_and_the_stream_goes_on(tmp_path):
    shards, good, _ = write_corpus(tmp_path, n_shards=2)
    data = (tmp_path / "shard-0001.tar").read_bytes()
    (tmp_path / "shard-0001.tar").write_bytes(data[: len(data) // 2] + b"\x00garbage" * 100)
    (tmp_path / "shard-0002.tar").write_bytes(b"not a tar at all")
    pattern = str(tmp_path / "shard-{0000..0002}.tar")
    keys, stats, _ = collect(PackedImageText(config(pattern), tokenizer=toy_tokenizer), workers=0)
    assert stats.get("corrupt_shard", 0) >= 2
    assert len(keys) == len(set(keys)) and set(keys) <= good and len(keys) > len(good) / 2
    # resampled (endless) mode keeps producing batches over the same bad shards
    cfg = config(pattern, resampled=True)
    keys, stats, _ = collect(PackedImageText(cfg, tokenizer=toy_tokenizer), workers=0, limit=30)
    assert len(keys) >= 30


@pytest.mark.parametrize(
    "policy",
    [
        ResolutionPolicy("native", max_side=512),
        ResolutionPolicy("native", max_side=100),
        ResolutionPolicy("side_sampling", 64, 384, "uniform"),
        ResolutionPolicy("side_sampling", 64, 384, "truncnorm"),
    ],
)
def test_aspect_ratio_kept_within_one_patch(policy):
    rng = random.Random(0)
    for _ in range(500):
        H0, W0 = rng.randint(16, 2000), rng.randint(16, 2000)
        if max(H0, W0) / min(H0, W0) > 8:
            continue
        H, W = target_size(H0, W0, policy, P, 256, rng)
        assert H % P == 0 and W % P == 0 and (H // P) * (W // P) <= 256
        h, w = H // P, W // P
        # the grid's other side is within one patch of what the aspect ratio asks
        assert abs(w - h * W0 / H0) <= 1 or abs(h - w * H0 / W0) <= 1, (H0, W0, h, w)


def test_side_sampling_distributions():
    rng = random.Random(0)
    uni = [
        target_size(1000, 1000, ResolutionPolicy("side_sampling", 64, 512, "uniform"), P, 4096, rng)[0]
        for _ in range(4000)
    ]
    tn = [
        target_size(1000, 1000, ResolutionPolicy("side_sampling", 64, 512, "truncnorm"), P, 4096, rng)[0]
        for _ in range(4000)
    ]
    assert min(uni) >= 64 and max(uni) <= 512
    assert abs(sum(uni) / len(uni) - 288) < 10
    assert sum(tn) / len(tn) < 288 - 30  # biased to low resolutions


def test_beta_drop_rate_mean():
    rng = random.Random(1)
    for mean in (0.25, 0.5):
        cfg = TokenDropConfig("beta", rate=mean, d_max=0.9)
        rates = [sample_drop_rate(196, cfg, rng) for _ in range(10_000)]
        assert abs(sum(rates) / len(rates) - mean) < 0.01
        assert 0 <= min(rates) and max(rates) <= 0.9
        mu = mean / 0.9
        var = sum((r / 0.9 - mu) ** 2 for r in rates) / len(rates)
        assert abs(var - 0.3 * mu * (1 - mu)) < 0.01


def test_other_drop_kinds_and_schedule():
    rng = random.Random(0)
    assert sample_drop_rate(100, TokenDropConfig("none"), rng) == 0
    assert sample_drop_rate(100, TokenDropConfig("fixed", 0.3), rng) == 0.3
    res = TokenDropConfig("resolution", rate=0.1, d_max=0.8, max_tokens=1000)
    small = sum(sample_drop_rate(50, res, rng) for _ in range(500)) / 500
    big = sum(sample_drop_rate(900, res, rng) for _ in range(500)) / 500
    assert small < big
    # rate is the mean at 0 tokens: 0 keeps small images whole and still drops from large ones
    res0 = TokenDropConfig("resolution", rate=0.0, d_max=0.8, max_tokens=64)
    assert sample_drop_rate(1, res0, rng) < 0.1 and sample_drop_rate(64, res0, rng) > 0.7
    sched = TokenDropConfig("fixed", 0.5, schedule=[(0, 0.5), (100, 0.1)])
    assert sched.rate_at(0) == 0.5 and abs(sched.rate_at(50) - 0.3) < 1e-9 and sched.rate_at(1000) == 0.1
    sched.validate()
    bad = [
        TokenDropConfig("fixed", 0.5, schedule=[(100, 0.5), (0, 0.1)]),  # steps go back
        TokenDropConfig("fixed", 0.5, schedule=[(0, 0.5), (100, 1.2)]),  # a rate past 1
        TokenDropConfig("beta", 0.5, d_max=0.8, schedule=[(0, 0.9)]),  # past beta's d_max
    ]
    for cfg in bad:
        with pytest.raises(ValueError, match="token_drop.schedule"):
            cfg.validate()


def test_a_scheduled_side_range_widens_with_the_step():
    """resolution.schedule moves the side range's upper end over training steps: early steps draw
    only up to the first max_side, later ones reach the last; bad schedules are clear errors."""
    policy = ResolutionPolicy("side_sampling", min_side=32, schedule=[(0, 64), (10, 64), (20, 256)])
    policy.validate()
    assert [policy.max_side_at(s) for s in (0, 10, 15, 20, 99)] == [64, 64, 160, 256, 256]
    rng = random.Random(0)
    early = [max(target_size(100, 100, policy, P, 10_000, rng, step=5)) for _ in range(200)]
    late = [max(target_size(100, 100, policy, P, 10_000, rng, step=30)) for _ in range(200)]
    assert max(early) <= 64 + P and max(late) > 200
    bad = [
        ResolutionPolicy("side_sampling", min_side=32, schedule=[(10, 64), (5, 128)]),  # steps go back
        ResolutionPolicy("side_sampling", min_side=96, schedule=[(0, 64)]),  # under min_side
        ResolutionPolicy("native", schedule=[(0, 64)]),  # nothing to schedule
    ]
    for policy in bad:
        with pytest.raises(ValueError, match="resolution.schedule"):
            policy.validate()


def test_a_reach_draws_a_share_of_images_past_the_range():
    """resolution.reach_prob / reach_side: that share of images draws its side from [max_side,
    reach_side] (the large budgets' tail), the rest from [min_side, max_side]; the largest side (which
    sizes the position grid) counts the reach; without it the draws are the plain range's, same seed."""
    policy = ResolutionPolicy("side_sampling", min_side=64, max_side=128, reach_prob=0.2, reach_side=256)
    policy.validate()
    assert policy.largest_side() == 256
    rng = random.Random(0)
    sides = [max(target_size(1000, 1000, policy, P, 10_000, rng)) for _ in range(2000)]
    far = [s for s in sides if s > 128 + P]
    assert min(sides) >= 64 - P and max(sides) <= 256 + P and max(sides) > 224
    assert 0.15 < len(far) / len(sides) < 0.25
    scheduled = ResolutionPolicy(  # the tail starts where the scheduled range ends at that step
        "side_sampling", min_side=64, schedule=[(0, 96), (10, 128)], reach_prob=1.0, reach_side=256
    )
    assert min(max(target_size(1000, 1000, scheduled, P, 10_000, rng, step=0)) for _ in range(200)) >= 96 - P
    # no tail: one uniform draw an image, as before the tail existed (runs keep their seeds' draws)
    rng, ref = random.Random(1), random.Random(1)
    for _ in range(50):
        side = max(target_size(1000, 1000, ResolutionPolicy("side_sampling", 64, 128), P, 10_000, rng))
        assert abs(side - (64 + ref.random() * 64)) <= P / 2 + 1
    bad = [
        ResolutionPolicy("side_sampling", 64, 128, reach_prob=1.5, reach_side=256),  # not a share
        ResolutionPolicy("side_sampling", 64, 128, reach_prob=0.2, reach_side=100),  # inside the range
        ResolutionPolicy("native", reach_prob=0.2, reach_side=256),  # nothing drawn
    ]
    for policy in bad:
        with pytest.raises(ValueError, match="resolution.reach"):
            policy.validate()


def test_a_budget_share_sizes_images_to_the_token_count_and_the_rest_draw_sides():
    """resolution.budget_prob: that share of images gets budget_grid's size for `tokens` (aspect kept:
    the size `budget` gives, whatever the side range), the rest draw from the range; the most tokens an
    image can have counts the budget; bad shares and kinds are errors."""
    policy = ResolutionPolicy("side_sampling", min_side=160, max_side=256, tokens=36, budget_prob=0.3)
    policy.validate()
    budget = ResolutionPolicy("budget", tokens=36)
    rng = random.Random(0)
    for h, w in ((1000, 1000), (300, 600), (700, 350)):
        sizes = [target_size(h, w, policy, P, 10_000, rng) for _ in range(2000)]
        at_budget = [s for s in sizes if s == target_size(h, w, budget, P, 10_000, rng)]
        assert 0.25 < len(at_budget) / len(sizes) < 0.35
        assert all(max(s) >= 160 - P for s in sizes if s not in at_budget)  # the rest: from the range
    small = ResolutionPolicy("side_sampling", min_side=16, max_side=32, tokens=100, budget_prob=0.5)
    assert policy_max_tokens(small, P) == 100 and policy_max_tokens(policy, P) == 17 * 17
    assert trained_side(small, P) == 10 and trained_side(policy, P) == 16  # rope_span's cap counts both
    bad = [
        ResolutionPolicy("side_sampling", 64, 128, tokens=36, budget_prob=1.5),  # not a share
        ResolutionPolicy("side_sampling", 64, 128, tokens=0, budget_prob=0.5),  # no budget
        ResolutionPolicy("native", tokens=36, budget_prob=0.5),  # nothing drawn
    ]
    for policy in bad:
        with pytest.raises(ValueError, match="resolution.budget_prob"):
            policy.validate()


def test_dropping_frees_room_for_more_images(tmp_path):
    shards, good, _ = write_corpus(tmp_path, bad_every=10**9)
    plain = collect(PackedImageText(config(shards), tokenizer=toy_tokenizer), workers=0)[1]
    dropped = collect(
        PackedImageText(config(shards, token_drop=TokenDropConfig("fixed", 0.5)), tokenizer=toy_tokenizer),
        workers=0,
    )[1]
    assert plain["images"] == dropped["images"] == len(good)
    assert dropped["tokens"] < 0.6 * plain["tokens"] and dropped["tokens_dropped"] > 0


def test_decode_conversions():
    base = Image.new("RGB", (30, 20), (200, 10, 10))
    cases = {
        "palette": encode(base.convert("P")),
        "alpha": encode(Image.new("RGBA", (30, 20), (200, 10, 10, 0))),
        "cmyk": encode(base.convert("CMYK"), "JPEG"),
        "gray": encode(base.convert("L")),
        "gray16": encode(Image.new("I;16", (30, 20), 40000)),
    }
    for name, data in cases.items():
        img, _ = decode_image(data, MAX_PIXELS, 20)
        assert img.mode == "RGB" and img.size == (30, 20), name
    assert decode_image(cases["alpha"], MAX_PIXELS, 20)[0].getpixel((0, 0)) == (
        255,
        255,
        255,
    )  # alpha over white
    assert decode_image(cases["gray16"], MAX_PIXELS, 20)[0].getpixel((0, 0))[0] == round(40000 * 255 / 65535)
    # EXIF orientation 6 (rotate 90 degrees clockwise): a 30 x 20 picture is shown 20 x 30
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated, _ = decode_image(encode(base, "JPEG", exif=exif.tobytes()), MAX_PIXELS, 20)
    assert rotated.size == (20, 30)
    # draft decoding of a large rotated JPEG still yields the upright image, at least the target size
    big = Image.new("RGB", (800, 400), (10, 200, 10))
    img, target = decode_image(
        encode(big, "JPEG", exif=exif.tobytes()), MAX_PIXELS, 20, lambda h, w: (h // 4, w // 4)
    )
    assert target == (200, 100) and img.width * 2 == img.height and img.height >= 200 and img.height < 800
    # the same for a PNG, whose EXIF is only read while decoding: the size function sees the upright image
    seen = []
    png, target = decode_image(
        encode(big, "PNG", exif=exif.tobytes()), MAX_PIXELS, 20, lambda h, w: seen.append((h, w)) or (h, w)
    )
    assert seen == [(800, 400)] and png.size == (400, 800) and target == (800, 400)
    with pytest.raises(BadSample) as e:
        decode_image(encode(Image.new("L", (1200, 1000))), MAX_PIXELS, 20)
    assert e.value.reason == "too_many_pixels"


def test_make_shards_from_folder_and_table(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    for i in range(5):
        Image.new("RGB", (16 + i, 16)).save(src / f"img{i}.png")
        if i != 3:
            (src / f"img{i}.txt").write_text(f"picture {i}\n")
    counts = write_shards(pairs_from_folder(src), tmp_path / "out1", max_count=2)
    assert counts == {"written": 4, "skipped": 0}
    assert len(list((tmp_path / "out1").glob("*.tar"))) == 2
    table = tmp_path / "pairs.tsv"
    table.write_text("path\tcaption\nimages/img0.png\tzero\nimages/img1.png\tone\nimages/missing.png\tnone\n")
    counts = write_shards(pairs_from_table(table), tmp_path / "out2")
    assert counts == {"written": 2, "skipped": 1}
    with tarfile.open(next((tmp_path / "out2").glob("*.tar"))) as tar:
        names = tar.getnames()
    assert {n.split(".", 1)[1] for n in names} == {"png", "txt", "json"}
    cfg = config(str(next((tmp_path / "out2").glob("*.tar"))))
    keys, _, _ = collect(PackedImageText(cfg, tokenizer=toy_tokenizer), workers=0)
    assert len(keys) == 2


def test_bad_config_raises():
    with pytest.raises(ValueError, match="data.shards"):
        DataConfig().validate()
    with pytest.raises(ValueError, match="resolution.kind"):
        config("x.tar", resolution=ResolutionPolicy("square")).validate()
    with pytest.raises(ValueError, match="token_drop"):
        config("x.tar", token_drop=TokenDropConfig("beta", rate=0.95, d_max=0.9)).validate()


def test_patches_travel_as_uint8_and_are_normalised_on_the_device(tmp_path):
    with wds.TarWriter(str(tmp_path / "one.tar")) as sink:
        sink.write({"__key__": "k", "png": encode(Image.new("RGB", (32, 16), (255, 0, 128))), "txt": "pink"})
    for norm, (mean, std) in {"clip": (CLIP_MEAN, CLIP_STD), "half": ((0.5,) * 3, (0.5,) * 3)}.items():
        batch = next(
            iter(PackedImageText(config(str(tmp_path / "one.tar"), normalize=norm), tokenizer=toy_tokenizer))
        )
        assert batch.images.patches.dtype == torch.uint8
        moved = batch.to("cpu")
        pixel = moved.images.patches[0, 0].view(-1, 3)[0]
        expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(mean)) / torch.tensor(std)
        torch.testing.assert_close(pixel, expected)


def test_weighted_sources_mix_in_resampled_mode(tmp_path):
    rng = random.Random(0)
    for name in ("a", "b"):
        with wds.TarWriter(str(tmp_path / f"{name}.tar")) as sink:
            for i in range(20):
                sink.write({"__key__": f"{name}{i:03d}", "jpg": good_image(rng), "txt": name})
    sources = [
        {"urls": str(tmp_path / "a.tar"), "weight": 0.8},
        {"urls": str(tmp_path / "b.tar"), "weight": 0.2},
    ]
    cfg = config(sources, resampled=True, shuffle_buffer=0)
    keys, _, _ = collect(PackedImageText(cfg, tokenizer=toy_tokenizer), workers=0, limit=60)
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.7 < share_a < 0.9, share_a


@pytest.mark.parametrize("tokens", [16, 64, 200])
def test_budget_policy_keeps_aspect_and_budget(tokens):
    rng = random.Random(0)
    policy = ResolutionPolicy("budget", tokens=tokens)
    for _ in range(300):
        H0, W0 = rng.randint(16, 2000), rng.randint(16, 2000)
        if max(H0, W0) / min(H0, W0) > 6:
            continue
        H, W = target_size(H0, W0, policy, P, 4096, rng)
        h, w = H // P, W // P
        assert h * w <= tokens
        assert h * w >= 0.6 * tokens or min(h, w) == 1
        assert abs(w - h * W0 / H0) <= 1 or abs(h - w * H0 / W0) <= 1


def test_demo_shapes_any_background_gets_a_contrasting_colour():
    """The generator samples, never rejects: every background lightness has a foreground CONTRAST away."""
    import random

    from navit_clip.data.demo import CLASSNAMES, CONTRAST, _color, draw_shape

    rng = random.Random(0)
    for bg in (0.1, 0.3, 0.5, 0.55, 0.7, 0.9):
        for _ in range(50):
            _, _, fg = _color(rng, avoid_lightness=bg)
            assert abs(fg - bg) >= CONTRAST - 1e-9 and 0.0 <= fg <= 1.0
    for name in CLASSNAMES:
        img, caption = draw_shape(rng, name)
        assert name in caption and min(img.size) >= 16


def test_a_cut_shard_is_one_corrupt_shard_wherever_it_is_cut(tmp_path):
    """Cut inside a member's data, a tar raises twice (in the member, then in the tar); cut anywhere,
    the sample being read is part of the broken shard: one corrupt_shard, no extra skip."""
    write_corpus(tmp_path, n_shards=1)
    shard = tmp_path / "shard-0000.tar"
    intact = collect(PackedImageText(config(str(shard)), tokenizer=toy_tokenizer), workers=0)[1]
    data = shard.read_bytes()
    members = tarfile.open(shard).getmembers()
    # inside members' data (a cut in or at a header reads as a clean end of archive to Python's tarfile:
    # the samples before it are delivered, the cut one is one skip)
    cuts = [m.offset_data + m.size // 2 for m in members[4::5] if m.size > 1]
    assert len(cuts) >= 3
    for cut in cuts:
        shard.write_bytes(data[:cut])
        keys, stats, _ = collect(PackedImageText(config(str(shard)), tokenizer=toy_tokenizer), workers=0)
        assert stats.get("corrupt_shard") == 1, (cut, stats)
        for reason in [k for k in stats if k.startswith("skip_")]:
            assert stats[reason] <= intact.get(reason, 0), (cut, reason, stats)


def test_skips_after_the_last_batch_are_not_lost(tmp_path, caplog):
    """Finite data: counts read after a worker's last batch travel with that batch; a pass that made
    no batch at all logs them."""
    shards, _, bad_counts = write_corpus(tmp_path, n_shards=1, per_shard=12, bad_every=5)
    with wds.TarWriter(str(tmp_path / "shard-0001.tar")) as sink:  # a tail of bad samples only
        for i in range(7):
            sink.write({"__key__": f"tail{i}", "jpg": good_image(random.Random(i)), "txt": " "})
    _, stats, _ = collect(
        PackedImageText(config(str(tmp_path / "shard-{0000..0001}.tar"), shuffle_buffer=0), toy_tokenizer),
        workers=0,
    )
    assert stats.get("skip_no_caption", 0) == bad_counts["no_caption"] + 7
    with caplog.at_level("WARNING"):
        ds = PackedImageText(config(str(tmp_path / "shard-0001.tar")), toy_tokenizer)
        batches = list(make_loader(ds, num_workers=0))
    assert batches == [] and "made no batch; skipped: skip_no_caption 7" in caplog.text


def _first_batch(cfg, workers):
    return next(iter(make_loader(PackedImageText(cfg, tokenizer=toy_tokenizer), num_workers=workers)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 1])
def test_sources_without_a_usable_sample_stop_with_the_reasons_not_hang(tmp_path, workers):
    """Resampled shards never end: an empty tar, a tar of unusable samples or a non-tar file would be
    opened forever. Each stops the run with a message naming the shards and the skips counted."""
    from navit_clip.data.pipeline import NoUsableData

    with wds.TarWriter(str(tmp_path / "empty.tar")):
        pass
    with wds.TarWriter(str(tmp_path / "nocaption.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "jpg": good_image(random.Random(i)), "txt": "  "})
    (tmp_path / "notes.txt").write_text("not a tar file\n" * 100)
    cases = {
        "empty.tar": "shards opened in a row",
        "nocaption.tar": "samples in a row.*skip_no_caption",
        "notes.txt": "corrupt_shard",
    }
    for name, message in cases.items():
        cfg = config(str(tmp_path / name), resampled=True, max_bad_in_a_row=200)
        with pytest.raises(NoUsableData, match=message) as err:
            _first_batch(cfg, workers)
        assert "no usable sample" in str(err.value) and name in str(err.value)


def test_glob_patterns_name_the_same_shards_as_brace_ranges(tmp_path):
    """`shards/*.tar` (users type both) reads the files a brace range names, sorted, mixed with
    ranges and `::` lists too."""
    shards, _, _ = write_corpus(tmp_path, n_shards=3)
    braced = config(str(tmp_path / "shard-{0000..0002}.tar")).sources()
    assert config(str(tmp_path / "shard-*.tar")).sources() == braced
    assert config(str(tmp_path / "shard-000[0-2].tar")).sources() == braced
    mixed = config(f"{tmp_path / 'shard-0000.tar'}::{tmp_path / 'shard-000[12].tar'}").sources()
    assert mixed == braced
    config(str(tmp_path / "shard-*.tar")).check_files()


def test_missing_files_and_bad_fields_are_errors_before_any_work(tmp_path):
    shards, _, _ = write_corpus(tmp_path, n_shards=2)
    with pytest.raises(ValueError, match=r"1 of 3 shard files do not exist: .*shard-0002.tar"):
        PackedImageText(config(str(tmp_path / "shard-{0000..0002}.tar")), tokenizer=toy_tokenizer)
    with pytest.raises(ValueError, match=r"pattern '.*nothing-\*.tar' matches no file"):
        PackedImageText(config(str(tmp_path / "nothing-*.tar"), resampled=True))
    for field, value in (
        ("max_aspect", 0),
        ("max_pixels", 0),
        ("max_bad_in_a_row", 0),
        ("shuffle_buffer", -1),
    ):
        with pytest.raises(ValueError, match=f"data.{field}"):
            config(shards, **{field: value}).validate()


def test_schedules_follow_the_optimizer_step_across_workers_accumulation_and_epochs(tmp_path):
    """A batch carries the trainer's optimiser step it will be consumed at (what token-drop schedules
    read): batch i of the run is step i // accum, with 2 workers taking turns, and it keeps counting
    over the epochs of finite data and from a fresh-stream resume."""
    from navit_clip.distributed import DistInfo
    from navit_clip.train import endless

    shards, _, _ = write_corpus(tmp_path, n_shards=2, per_shard=12)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    ds = PackedImageText(config(shards, resampled=True), tokenizer=toy_tokenizer, accum=2)
    steps = [b.stats["step"] for b, _ in zip(make_loader(ds, num_workers=2), range(12))]
    assert steps == [i // 2 for i in range(12)]
    ds = PackedImageText(config(shards, num_workers=0), tokenizer=toy_tokenizer, accum=3, first_batch=30)
    per_epoch = sum(1 for _ in make_loader(ds, num_workers=0))
    steps = [b.stats["step"] for b, _ in zip(endless(make_loader(ds), ds, info), range(3 * per_epoch))]
    assert steps == [(30 + i) // 3 for i in range(3 * per_epoch)]
    # the schedule itself: a fixed rate that rises with the step is applied per batch
    drop = TokenDropConfig("fixed", rate=0.5, schedule=[(0, 0.0), (4, 0.5)])
    ds = PackedImageText(config(shards, resampled=True, token_drop=drop), tokenizer=toy_tokenizer, accum=2)
    batches = [b for b, _ in zip(make_loader(ds, num_workers=0), range(12))]
    assert batches[0].stats["tokens_dropped"] == 0 and batches[-1].stats["tokens_dropped"] > 0
    # and a scheduled side range: the first batches' images are small, the last ones' larger (images
    # are sized when read, so the packing buffer, a batch of tokens here, lags them a few batches)
    sides = ResolutionPolicy("side_sampling", min_side=32, schedule=[(0, 32), (2, 32), (3, 64)])
    ds = PackedImageText(
        config(shards, resampled=True, resolution=sides, pack_factor=1.0), tokenizer=toy_tokenizer
    )
    batches = [b for b, _ in zip(make_loader(ds, num_workers=0), range(16))]
    largest = [int(b.images.grid.amax()) for b in batches]  # the longer grid side, in patches
    assert max(largest[:2]) == 2 and min(largest[-4:]) > 2, largest
