import contextlib

import pytest
import torch

from navit_clip.model import NaViT, VisionConfig
from navit_clip.model.attention import AttentionPlan, block_attention
from navit_clip.model.layers import TOKEN_MULTIPLE, by_length, sdpa
from navit_clip.packing import build_packed_batch, first_fit, pack_images, patchify

P = 4


def tiny(**kw) -> NaViT:
    torch.manual_seed(0)
    cfg = dict(patch_size=P, width=32, depth=2, heads=4, attn_backend="dense")
    cfg.update(kw)
    return NaViT(VisionConfig(**cfg)).eval()


def images(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    sizes = [(8, 8), (4, 28), (20, 8), (12, 12), (4, 4), (16, 24)][:n]
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def alone(model, img):
    return model.encode_images([img])[0]


@pytest.mark.parametrize("backend", ["dense", "grouped", "flex"])
@pytest.mark.parametrize(
    "pool, posemb",
    [("map", "learned"), ("mean", "learned"), ("map", "rope2d"), ("mean", "rope2d+fractional")],
)
def test_packing_invariance(backend, pool, posemb):
    model = tiny(attn_backend=backend, pool=pool, posemb=posemb)
    imgs = images()
    with torch.no_grad():
        ref = torch.stack([alone(model, im) for im in imgs])
        for seq_len, max_images in [(64, 4), (96, 6), (64, 2), (40, 8)]:
            got = model.encode_images(imgs, seq_len=seq_len, max_images=max_images)
            assert rel(got, ref) < 1e-5, (seq_len, max_images)
        # reversed order puts every image at another position and in other company
        got = model.encode_images(imgs[::-1], seq_len=64, max_images=4).flip(0)
        assert rel(got, ref) < 1e-5


@pytest.mark.parametrize("backend", ["dense", "grouped", "flex"])
def test_garbage_in_padding_never_reaches_real_tokens(backend):
    """A user-built batch need not zero-fill its padding: NaN and inf there (0 x NaN inside a masked
    attention) must leave every image's tokens and pooled embedding as with zero padding."""
    model = tiny(attn_backend=backend)
    imgs = images()
    batch = pack_images(imgs, P, 64, 4)
    pad = batch.segment_ids == 0
    assert pad.any()
    with torch.no_grad():
        ref = model(batch)
        for garbage in (float("nan"), float("inf"), -float("inf"), 1e30):
            batch.patches[pad] = garbage
            out = model(batch)
            real = ~pad
            assert torch.isfinite(out.tokens[real]).all() and torch.isfinite(out.pooled).all(), garbage
            assert rel(out.tokens[real], ref.tokens[real]) < 1e-6 and rel(out.pooled, ref.pooled) < 1e-6


@pytest.mark.parametrize("backend", ["dense", "grouped", "flex"])
def test_image_position_inside_sequence_does_not_matter(backend):
    model = tiny(attn_backend=backend)
    imgs = images()
    cut = [patchify(im, P) for im in imgs]
    p, c = [x for x, _ in cut], [y for _, y in cut]
    with torch.no_grad():
        ref = torch.stack([alone(model, im) for im in imgs])
        # all images in one long sequence, in two different orders, and with empty slots in between
        for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2]):
            batch = build_packed_batch(p, c, [order], seq_len=160, max_images=8, num_seqs=2)
            pooled = model(batch).pooled
            for e, ex in enumerate(order):
                assert rel(pooled[0, e], ref[ex]) < 1e-5


@pytest.mark.parametrize("backend", ["dense", "grouped", "flex"])  # flex: forward only on CPU (no_grad)
def test_padding_values_change_no_output(backend):
    model = tiny(attn_backend=backend)
    imgs = images()
    cut = [patchify(im, P) for im in imgs]
    bins, _ = first_fit([x.shape[0] for x, _ in cut], 64, 4)
    batch = build_packed_batch([x for x, _ in cut], [y for _, y in cut], bins, 64, 4, num_seqs=len(bins) + 1)
    with torch.no_grad():
        out1 = model(batch)
        pad = batch.segment_ids == 0
        batch.patches[pad] = torch.randn_like(batch.patches[pad]) * 100
        batch.coords[pad] = 7
        batch.grid[pad] = 9
        out2 = model(batch)
    torch.testing.assert_close(out1.pooled, out2.pooled, rtol=0, atol=0)
    torch.testing.assert_close(out1.tokens[~pad], out2.tokens[~pad], rtol=0, atol=0)
    assert torch.all(out1.pooled[~batch.slot_valid] == 0)


CUDA = torch.cuda.is_available()
TRAIN_BACKENDS = ["grouped"] + [pytest.param(b, marks=pytest.mark.cuda) for b in ("flex", "varlen")]


@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
def test_backends_match_dense_outputs_and_grads(backend):
    """float32 within 1e-5; varlen (flash attention) exists only in bf16/fp16, so it is compared with
    the dense reference under bf16 autocast, within bf16's precision."""
    if backend in ("flex", "varlen") and not CUDA:
        pytest.skip("flex and varlen train only on CUDA (on CPU they fall back to dense, tested below)")
    device = "cuda" if backend in ("flex", "varlen") else "cpu"
    precision = (
        torch.autocast("cuda", dtype=torch.bfloat16) if backend == "varlen" else contextlib.nullcontext()
    )
    tol = 3e-2 if backend == "varlen" else 1e-5
    imgs = images()
    cut = [patchify(im, P) for im in imgs]
    bins, _ = first_fit([x.shape[0] for x, _ in cut], 64, 4)
    batch = build_packed_batch(
        [x for x, _ in cut], [y for _, y in cut], bins, 64, 4, num_seqs=len(bins) + 1
    ).to(device)
    real = batch.segment_ids > 0
    results = {}
    for b in ("dense", backend):
        model = tiny(attn_backend=b).train().to(device)
        with precision:
            out = model(batch)
            loss = (out.pooled.float() ** 2).sum() + (out.tokens[real].float() ** 3).mean()
        loss.backward()
        results[b] = (out, {n: p.grad.clone().cpu() for n, p in model.named_parameters()})
    (o_ref, g_ref), (o, g) = results["dense"], results[backend]
    assert rel(o.pooled, o_ref.pooled) < tol
    assert rel(o.tokens[real], o_ref.tokens[real]) < tol
    total = torch.cat([x.flatten() for x in g_ref.values()]).norm()
    for name in g_ref:
        if g_ref[name].norm() < 1e-6 * total:
            # zero in exact arithmetic (a key bias shifts every logit of a row equally): both ~0
            assert g[name].norm() < max(tol, 1e-6) * total, name
        else:
            assert rel(g[name], g_ref[name]) < tol, name


def test_filler_repeats_real_tokens_after_the_sequences():
    """`by_length` pads the layout to a multiple with copies of real tokens, in a group of its own;
    the real part is the unpadded layout."""
    starts, lengths = torch.tensor([0, 10, 20, 30]), torch.tensor([3, 5, 3, 2])
    plain, padded = by_length(starts, lengths), by_length(starts, lengths, multiple=8)
    assert plain.real == padded.real == 13 and len(plain.index) == 13 and len(padded.index) == 16
    assert torch.equal(padded.index[:13], plain.index) and padded.groups == plain.groups + [(1, 3)]
    assert torch.equal(padded.index[13:], plain.index[:3]) and torch.equal(
        padded.position[13:], plain.position[:3]
    )
    assert by_length(starts, lengths, multiple=13).groups == plain.groups  # already a multiple: no filler


def test_cpu_autocast_runs_attention_in_float32():
    """Under CPU bf16 autocast, attention runs in float32 (its bf16 backward is several times slower
    on CPU): the same values and gradients as float32 attention on the same inputs, while the model's
    matmuls run in bf16 and its outputs stay within bf16's precision of float32."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 8, requires_grad=True) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = sdpa(q, k, v, is_causal=True)
    assert o.dtype == torch.float32 and torch.equal(o, ref)
    for g, r in zip(torch.autograd.grad(o.sum(), (q, k, v)), ref_grads):
        assert torch.equal(g, r)
    imgs = images()
    cut = [patchify(im, P) for im in imgs]
    bins, _ = first_fit([x.shape[0] for x, _ in cut], 64, 4)
    batch = build_packed_batch([x for x, _ in cut], [y for _, y in cut], bins, 64, 4)
    outs = []
    for precision in (contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
        model = tiny(attn_backend="grouped").train()
        with precision:
            pooled = model(batch).pooled
        pooled.float().pow(2).sum().backward()
        outs.append((pooled.detach().float(), model.blocks[0].attn.qkv.weight.grad))
    assert rel(outs[1][0], outs[0][0]) < 3e-2 and rel(outs[1][1], outs[0][1]) < 3e-2


def test_block_attention_kernel_level():
    torch.manual_seed(1)
    seg = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 0]])
    q, k, v = (torch.randn(2, 7, 2, 8, requires_grad=True) for _ in range(3))
    real = (seg > 0)[..., None, None]
    outs, grads = {}, {}
    for b in ("dense", "grouped"):
        plan = AttentionPlan.build(seg, b)
        if plan.flat:
            o = (
                plan.from_flat(block_attention(plan.to_flat(q), plan.to_flat(k), plan.to_flat(v), plan))
                * real
            )
        else:
            o = block_attention(q, k, v, plan) * real
        o.pow(2).sum().backward()
        outs[b], grads[b] = o, [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
    plan = AttentionPlan.build(seg, "grouped")
    assert plan.real == 11 and len(plan.perm) == TOKEN_MULTIPLE  # 53 filler tokens took part above
    assert rel(outs["grouped"], outs["dense"]) < 1e-5
    for x, y in zip(grads["grouped"], grads["dense"]):
        assert rel(x, y) < 1e-5
    with torch.no_grad():  # FlexAttention on CPU: forward only
        plan = AttentionPlan.build(seg, "flex")
        assert plan.backend == "flex"
        assert rel(block_attention(q.detach(), k.detach(), v.detach(), plan) * real, outs["dense"]) < 1e-5
    assert AttentionPlan.build(seg, "flex").backend == "dense"  # grad on, CPU: falls back


def test_unavailable_backend_falls_back_with_one_notice(caplog):
    from navit_clip.model import attention

    attention._warned.clear()
    seg = torch.tensor([[1, 1, 0]])
    with caplog.at_level("WARNING"):
        plans = [AttentionPlan.build(seg, "varlen") for _ in range(3)]
    assert all(p.backend == "dense" for p in plans)
    assert sum("varlen" in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match="attn_backend"):
        AttentionPlan.build(seg, "magic")


@pytest.mark.parametrize(
    "posemb",
    ["learned", "fractional", "sinusoidal", "fourier", "rope2d", "rope2d+learned", "rope2d+fractional"],
)
def test_posemb_variants_on_unseen_grids(posemb):
    # max_grid=16 is the "training" table: 1 x 40 and 37 x 3 go past it.
    model = tiny(posemb=posemb, max_grid=16)
    imgs = [torch.rand(3, P, 40 * P), torch.rand(3, 37 * P, 3 * P), torch.rand(3, P, P)]
    with torch.no_grad():
        out = model.encode_images(imgs)
    assert out.shape == (3, 32) and torch.isfinite(out).all()


def _axis_rows(pe, side: int):
    """phi_y of positions 0..side-1 of a grid `side` patches tall: [side, D]."""
    with torch.no_grad():
        return pe._axis(torch.arange(side)[None], torch.full((1, side), side), "y")[0]


def test_position_embeddings_have_their_properties():
    from navit_clip.model.posemb import FactorizedPosEmb

    torch.manual_seed(0)
    T = 8
    learned, fractional = FactorizedPosEmb("learned", 16, max_grid=T), FactorizedPosEmb("fractional", 16, T)
    # learned: a grid that fits reads the table's rows exactly (no interpolation error)
    assert torch.equal(_axis_rows(learned, 5), learned.table_y[:5].detach())
    # past the table it is stretched onto it, never clamped: ends map to the ends, rows stay distinct
    long = _axis_rows(learned, 3 * T)
    assert rel(long[0], learned.table_y[0]) < 1e-6 and rel(long[-1], learned.table_y[-1]) < 1e-6
    assert len({tuple(r.tolist()) for r in long}) == 3 * T
    # fractional: the same relative position gets the same embedding whatever the grid size
    for small, big in ((4, 8), (3, 12), (5, 20)):
        a, b = _axis_rows(fractional, small), _axis_rows(fractional, big)
        for i in range(small):
            assert rel(a[i], b[i * big // small]) < 1e-6


def test_rope2d_attention_depends_on_relative_position_only():
    """Rotated queries and keys: the score of a (query, key) pair is unchanged when both tokens move
    by the same (row, col) offset, and differs when only one moves."""
    from navit_clip.model.posemb import with_rope2d

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 2, 8, generator=g), torch.randn(1, 2, 2, 8, generator=g)

    def scores(coords):
        seen = {}
        with_rope2d(lambda q_, k_, v_: seen.setdefault("s", (q_[0, 0] * k_[0, 1]).sum(-1)), coords, 8)(
            q, k, q
        )
        return seen["s"]

    base = scores(torch.tensor([[[0, 0], [2, 3]]]))
    assert rel(scores(torch.tensor([[[40, 7], [42, 10]]])), base) < 1e-5  # both moved by (40, 7)
    assert rel(scores(torch.tensor([[[0, 0], [3, 2]]])), base) > 1e-2
    with pytest.raises(ValueError, match="divisible by 4"):
        NaViT(VisionConfig(width=24, heads=4, posemb="rope2d"))


def test_split_linear_equals_the_fused_product_with_contiguous_parts():
    """q, k, v as three products of one qkv layer: the values and gradients of the fused product's
    slices (float64, to rounding), each part contiguous (nothing for qk-norm or attention to copy)."""
    from navit_clip.model.layers import split_linear

    g = torch.Generator().manual_seed(0)
    for bias in (False, True):
        layer = torch.nn.Linear(8, 24, bias=bias).double()
        x = torch.randn(5, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
        dy = torch.randn(5, 7, 24, generator=g, dtype=torch.float64)
        parts = split_linear(layer, x, 3)
        assert all(p.is_contiguous() and p.shape == (5, 7, 8) for p in parts)
        fused = layer(x)
        assert rel(torch.cat(parts, -1), fused) < 1e-12
        params = (x, *layer.parameters())
        ours = torch.autograd.grad(parts, params, dy.chunk(3, -1))
        for a, b in zip(ours, torch.autograd.grad(fused, params, dy)):
            assert rel(a, b) < 1e-12


def test_init_puts_both_ends_of_the_tower_at_unit_scale():
    """The blocks' Linear layers at std 0.02; the patch projection lecun-normal (std fan_in^-0.5) and
    the MAP head's layers xavier-uniform (std sqrt(2 / (fan_in + fan_out)), k and v each a D x D
    matrix); biases 0. With the ends at 0.02 the warm-up collapsed the embeddings (bench/NOTES.md)."""
    D = 192
    tower = NaViT(VisionConfig(width=D, depth=2, heads=3, bias=True))
    stds = {}
    for name, m in tower.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert not m.bias.any(), name
            for i, w in enumerate(m.weight.detach().chunk(2 if name == "head.kv" else 1)):
                fan_out, fan_in = w.shape
                if name == "patch_embed":
                    want = fan_in**-0.5
                elif name.startswith("head."):
                    want = (2 / (fan_in + fan_out)) ** 0.5
                else:
                    want = 0.02
                stds[f"{name}.{i}"] = (float(w.std()), want)
    assert len(stds) == 1 + 2 * 4 + 6  # embed, 2 blocks (qkv, proj, fc1, fc2), MAP head (q, k, v, ...)
    for key, (got, want) in stds.items():
        assert abs(got / want - 1) < 0.05, f"{key}: std {got:.4f}, want {want:.4f}"
    x = torch.randn(4096, tower.patch_embed.in_features)  # unit-variance pixels -> unit-scale tokens
    assert abs(float(tower.patch_embed(x).detach().std()) - 1) < 0.05


def test_rope2d_training_rotation_equals_the_plain_ops_with_its_own_backward():
    """Training rotates q and k through a hand-written backward (posemb._RotateQK); its outputs are
    bitwise those of the plain ops that inference and export run, and its gradients are autograd's
    through those ops (float64: to rounding), in every precision it runs in."""
    from navit_clip.model.posemb import _rotate, _rotate_qk, rope2d_rotation

    g = torch.Generator().manual_seed(0)
    cos, ssin = rope2d_rotation(torch.rand(2, 9, 2, generator=g) * 20, 16)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        q, k = (torch.randn(2, 9, 3, 16, generator=g).to(dtype).requires_grad_() for _ in range(2))
        dq, dk = (torch.randn(2, 9, 3, 16, generator=g).to(dtype) for _ in range(2))
        fast = _rotate_qk(q, k, cos, ssin)
        plain = _rotate(q, cos, ssin), _rotate(k, cos, ssin)
        assert type(fast[0].grad_fn).__name__ == "_RotateQKBackward"
        assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(fast, plain))
        for a, b in zip(
            torch.autograd.grad(fast, (q, k), (dq, dk)), torch.autograd.grad(plain, (q, k), (dq, dk))
        ):
            assert a.dtype == dtype and rel(a.double(), b.double()) < tol
    with torch.no_grad():  # inference takes the plain ops
        assert _rotate_qk(q, k, cos, ssin)[0].grad_fn is None


def test_rope2d_fractional_positions_do_not_depend_on_resolution():
    """rope_span > 0: an image's longer side spans `span` units at every resolution (aspect kept), so a
    region of a larger rendering sits where the same region of a smaller one does; span 0: patch
    indices, unbounded."""
    from navit_clip.model.posemb import rope2d_positions

    def positions(h, w, span):
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = torch.stack([rows.flatten(), cols.flatten()], -1)[None]
        return rope2d_positions(coords, torch.tensor([h, w]).expand_as(coords), span)[0].view(h, w, 2)

    small, big = positions(3, 5, 16.0), positions(6, 10, 16.0)  # the same image at twice the resolution
    pooled = big.view(3, 2, 5, 2, 2).mean((1, 3))  # each 2 x 2 block of the big grid: one small patch
    assert rel(pooled, small) < 1e-6
    assert rel(small[..., 1].max() + small[..., 1].min(), torch.tensor(16.0)) < 1e-6  # the width spans 16
    assert rel(small[..., 0].max() + small[..., 0].min(), torch.tensor(16.0 * 3 / 5)) < 1e-6  # aspect kept
    assert torch.equal(positions(6, 10, 0.0)[5, 9], torch.tensor([5.0, 9.0]))
    with pytest.raises(ValueError, match="rope_span"):
        NaViT(VisionConfig(width=32, heads=4, depth=1, rope_span=-1.0))


def test_rope2d_capped_positions_are_patch_steps_up_to_the_span_and_interpolated_past_it():
    """rope_mode=cap: an image up to `span` patches long keeps one unit per patch (what it was trained
    with); a longer one is shrunk to span `span` units, aspect kept (position interpolation)."""
    from navit_clip.model.posemb import rope2d_positions

    def positions(h, w, span, mode):
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = torch.stack([rows.flatten(), cols.flatten()], -1)[None]
        return rope2d_positions(coords, torch.tensor([h, w]).expand_as(coords), span, mode)[0].view(h, w, 2)

    for h, w in [(3, 5), (8, 2), (8, 8)]:  # within the span: patch steps (offsets are what rope sees)
        pos = positions(h, w, 8.0, "cap")
        assert torch.equal(pos - pos[0, 0], positions(h, w, 0.0, "cap"))
    big, small = positions(12, 16, 8.0, "cap"), positions(6, 8, 8.0, "cap")  # twice the largest trained
    assert rel(big.view(6, 2, 8, 2, 2).mean((1, 3)), small) < 1e-6  # shrunk onto the trained span
    assert rel(big[..., 1].max() + big[..., 1].min(), torch.tensor(8.0)) < 1e-6
    assert rel(big, positions(12, 16, 8.0, "span")) < 1e-6  # past the span both modes agree
    with pytest.raises(ValueError, match="rope_mode"):
        NaViT(VisionConfig(width=32, heads=4, depth=1, rope_mode="clamp"))


def test_encode_images_keeps_input_order_and_raises_seq_len_for_big_images():
    model = tiny()
    imgs = images()
    with torch.no_grad():
        out = model.encode_images(imgs, seq_len=16)  # the 16 x 24 image has 24 tokens > seq_len=16
        for i, im in enumerate(imgs):
            assert rel(out[i], alone(model, im)) < 1e-5


def test_bad_config_raises():
    with pytest.raises(ValueError, match="divisible"):
        NaViT(VisionConfig(width=30, heads=4))
    with pytest.raises(ValueError, match="posemb"):
        NaViT(VisionConfig(width=32, heads=4, depth=1, posemb="rope"))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_slot_pooling_equals_per_image_attention_and_mean(qk_norm):
    """The MAP head and mean pooling scatter per token into slot rows (O(tokens)); check both, values
    and gradients, against the definition computed image by image in float64: one probe query
    attending over that image's tokens (softmax(q k^T / sqrt(d)) v per head), and a plain mean."""
    from navit_clip.model.layers import MAPHead, mean_pool, slot_index

    torch.manual_seed(0)
    cfg = VisionConfig(width=32, heads=4, qk_norm=qk_norm)
    head = MAPHead(cfg).double()
    seg_BL = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 2, 2, 3]])
    valid_BE = torch.tensor([[True, True, False], [True, True, True]])
    x_BLD = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    slot_N = slot_index(seg_BL, 3).flatten()
    assert slot_N.tolist() == [0, 0, 0, 1, 1, 6, 6, 3, 4, 4, 4, 4, 4, 5]  # padding -> spare row 6
    w_SD = torch.randn(6, 32, dtype=torch.float64)

    def reference(x_BLD):
        H, d = 4, 8
        q_Hd = head.q_norm(head.q(head.probe).view(H, d))
        out = []
        for b, e in [(b, e) for b in range(2) for e in range(3)]:
            if not valid_BE[b, e]:
                out.append(x_BLD.new_zeros(32))
                continue
            x_nD = x_BLD[b][seg_BL[b] == e + 1]
            k_nHd, v_nHd = head.kv(x_nD).view(-1, 2, H, d).unbind(1)
            a_nH = torch.softmax((head.k_norm(k_nHd) * q_Hd).sum(-1) / d**0.5, dim=0)
            y = head.proj((a_nH[..., None] * v_nHd).sum(0).reshape(32))
            out.append(y + head.mlp(head.norm(y)))
        return torch.stack(out)

    for fn, ref in (
        (lambda x: head(x.flatten(0, 1), slot_N, valid_BE.flatten()), reference),
        (
            lambda x: mean_pool(x.flatten(0, 1), slot_N, 6),
            lambda x: torch.stack(
                [
                    x[b][seg_BL[b] == e + 1].mean(0) if valid_BE[b, e] else x.new_zeros(32)
                    for b in range(2)
                    for e in range(3)
                ]
            ),
        ),
    ):
        got, want = fn(x_BLD), ref(x_BLD)
        g_got = torch.autograd.grad((got * w_SD).sum(), x_BLD)[0]
        g_want = torch.autograd.grad((want * w_SD).sum(), x_BLD)[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    assert got[2].abs().max() == 0  # the empty slot
