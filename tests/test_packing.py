import pytest
import torch

from navit_clip.packing import (
    build_packed_batch,
    first_fit,
    grid_size,
    pack_images,
    patchify,
    unpack_slots,
    unpatchify,
)


def test_patchify_roundtrip_and_coords():
    img = torch.randn(3, 8, 12)
    patches, coords = patchify(img, 4)
    assert patches.shape == (2 * 3, 4 * 4 * 3)
    assert coords.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    torch.testing.assert_close(unpatchify(patches, 2, 3, 4), img)
    # patch (row 1, col 2) holds pixels [4:8, 8:12], flattened as (py, px, channel)
    torch.testing.assert_close(patches[5].view(4, 4, 3), img[:, 4:8, 8:12].permute(1, 2, 0))


@pytest.mark.parametrize("hw", [(37, 90), (15, 16), (1, 200), (300, 7), (64, 64)])
def test_resize_rule_keeps_aspect_within_one_patch(hw):
    H, W = hw
    P = 16
    h, w = grid_size(H, W, P)
    assert abs(h * P - H) <= P / 2 or h == 1
    assert abs(w * P - W) <= P / 2 or w == 1
    patches, coords = patchify(torch.rand(3, H, W), P)
    assert patches.shape == (h * w, P * P * 3)
    assert coords.max(0).values.tolist() == [h - 1, w - 1]


def test_bad_image_shapes_raise():
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        patchify(torch.rand(4, 8, 8), 4)
    with pytest.raises(ValueError, match="empty"):
        grid_size(0, 5, 4)


def test_first_fit_respects_limits_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 200, (500,), generator=g).tolist()
    for L, E in [(256, 4), (1024, 16), (200, 1)]:
        bins, left = first_fit(sizes, L, E)
        assert not left
        assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
        assert all(sum(sizes[i] for i in b) <= L and len(b) <= E for b in bins)
        assert (bins, left) == first_fit(list(sizes), L, E)
    bins, left = first_fit(sizes, 256, 8, num_seqs=10)
    assert len(bins) == 10 and left and all(sum(sizes[i] for i in b) <= 256 for b in bins)
    assert sorted([i for b in bins for i in b] + left) == list(range(len(sizes)))


def test_example_longer_than_seq_len_names_its_size():
    with pytest.raises(ValueError, match="example 1 has 300 tokens.*seq_len=256"):
        first_fit([10, 300], 256, 4)


def test_packed_batch_layout():
    imgs = [torch.rand(3, 8, 8), torch.rand(3, 4, 12), torch.rand(3, 12, 4)]
    batch = pack_images(imgs, 4, seq_len=8, max_images=2)
    B, L, E = batch.segment_ids.shape[0], 8, 2
    assert batch.patches.shape == (B, L, 48) and batch.slot_valid.shape == (B, E)
    assert batch.num_images == 3
    # every example sits in exactly one slot, with its own token count and grid
    found = sorted(batch.slot_example[batch.slot_valid].tolist())
    assert found == [0, 1, 2]
    for b in range(B):
        for e in range(E):
            if not batch.slot_valid[b, e]:
                continue
            ex = int(batch.slot_example[b, e])
            tok = batch.segment_ids[b] == e + 1
            p, c = patchify(imgs[ex], 4)
            torch.testing.assert_close(batch.patches[b, tok], p)
            assert batch.coords[b, tok].tolist() == c.tolist()
            h, w = grid_size(*imgs[ex].shape[1:], 4)
            assert batch.grid[b, tok].tolist() == [[h, w]] * (h * w)
    assert batch.padding_fraction == pytest.approx(1 - 10 / (B * L))
    vals = torch.arange(B * E, dtype=torch.float32).view(B, E, 1)
    out = unpack_slots(vals, batch, 3)
    for b in range(B):
        for e in range(E):
            if batch.slot_valid[b, e]:
                assert out[batch.slot_example[b, e], 0] == vals[b, e, 0]


def test_build_rejects_overflowing_plan():
    p = [torch.zeros(5, 3), torch.zeros(5, 3)]
    c = [torch.zeros(5, 2, dtype=torch.long)] * 2
    with pytest.raises(ValueError, match="more than seq_len"):
        build_packed_batch(p, c, [[0, 1]], seq_len=8, max_images=2)
    with pytest.raises(ValueError, match="more than max_images"):
        build_packed_batch(p, c, [[0, 1]], seq_len=16, max_images=1)
