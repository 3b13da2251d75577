"""Chunked ring loss vs float64 naive references and open_clip's ClipLoss, on real gloo ranks."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_world

from navit_clip.loss import ContrastiveLoss, _Ring, clip_loss, sigmoid_loss

B_LOCAL, D, TILE = 6, 16, 4


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def naive_clip(I, T, valid, t):
    I, T = I[valid], T[valid]
    z = t.exp() * I @ T.T
    y = torch.arange(len(I))
    return (F.cross_entropy(z, y) + F.cross_entropy(z.T, y)) / 2


def naive_sigmoid(I, T, valid, t, bias):
    I, T = I[valid], T[valid]
    x = t.exp() * I @ T.T + bias
    y = 2 * torch.eye(len(I), dtype=x.dtype) - 1
    return -F.logsigmoid(y * x).sum() / len(I)


def make_problem(world: int, masked: bool, seed: int = 0):
    """Global features, replicated projections and a validity mask with uneven counts per rank."""
    g = torch.Generator().manual_seed(seed)
    n = world * B_LOCAL
    Xi, Xt = (
        torch.randn(n, D, generator=g, dtype=torch.float64),
        torch.randn(n, D, generator=g, dtype=torch.float64),
    )
    Wi, Wt = (
        torch.randn(D, D, generator=g, dtype=torch.float64) / 4,
        torch.randn(D, D, generator=g, dtype=torch.float64) / 4,
    )
    valid = torch.ones(n, dtype=torch.bool)
    if masked:
        for r in range(world):
            valid[r * B_LOCAL + (B_LOCAL - r % 3 - 1) : (r + 1) * B_LOCAL] = False  # uneven counts
        if world > 1:
            valid[(world - 1) * B_LOCAL :] = False  # the last rank has no valid slot at all
        else:
            valid[2] = False
    return Xi, Xt, Wi, Wt, valid


def reference(kind, Xi, Xt, Wi, Wt, valid, t0, b0):
    """float64, single process, full matrix, ordinary autograd."""
    Wi, Wt = Wi.clone().requires_grad_(), Wt.clone().requires_grad_()
    t, bias = (
        torch.tensor(t0, dtype=torch.float64, requires_grad=True),
        torch.tensor(b0, dtype=torch.float64, requires_grad=True),
    )
    I, T = F.normalize(Xi @ Wi, dim=-1), F.normalize(Xt @ Wt, dim=-1)
    I.retain_grad(), T.retain_grad()
    loss = naive_clip(I, T, valid, t) if kind == "softmax" else naive_sigmoid(I, T, valid, t, bias)
    loss.backward()
    return loss, Wi.grad, Wt.grad, t.grad, bias.grad, I.grad, T.grad


def ours_on_rank(kind, rank, world, Xi, Xt, Wi, Wt, valid, t0, b0, dtype=torch.float32, **opts):
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    Wi, Wt = Wi.to(dtype).clone().requires_grad_(), Wt.to(dtype).clone().requires_grad_()
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.tensor(t0, dtype=pdtype, requires_grad=True)
    bias = torch.tensor(b0, dtype=pdtype, requires_grad=True)
    I = F.normalize(Xi[sl].to(dtype) @ Wi, dim=-1)
    T = F.normalize(Xt[sl].to(dtype) @ Wt, dim=-1)
    I.retain_grad(), T.retain_grad()
    fn = ContrastiveLoss(kind, **opts)
    loss = fn(I, T, valid[sl], t, bias if kind == "sigmoid" else None)
    loss.backward()
    grads = [Wi.grad, Wt.grad, t.grad] + ([bias.grad] if kind == "sigmoid" else [])
    if dist.is_initialized():  # what DDP / FSDP do to replicated parameters
        for g in grads:
            dist.all_reduce(g)
            g /= world
    return loss, grads, I.grad / world, T.grad / world


def _check_against_reference(rank, world, kind, masked, dtype, tol, opts):
    Xi, Xt, Wi, Wt, valid = make_problem(world, masked)
    t0, b0 = 2.0, -1.5
    ref = reference(kind, Xi, Xt, Wi, Wt, valid, t0, b0)
    loss, grads, dI, dT = ours_on_rank(kind, rank, world, Xi, Xt, Wi, Wt, valid, t0, b0, dtype, **opts)
    assert rel(loss, ref[0]) < tol, (kind, rel(loss, ref[0]))
    names = ["W_img", "W_txt", "logit_scale"] + (["logit_bias"] if kind == "sigmoid" else [])
    for name, g, r in zip(names, grads, ref[1:5]):
        assert rel(g, r) < tol, (kind, name, rel(g, r))
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    assert rel(dI, ref[5][sl]) < tol and rel(dT, ref[6][sl]) < tol, (kind, rel(dI, ref[5][sl]))
    local_valid = valid[sl]
    assert torch.all(dI[~local_valid] == 0) and torch.all(dT[~local_valid] == 0)
    assert torch.isfinite(dI).all() and torch.isfinite(dT).all()


def _check_against_open_clip(rank, world):
    from open_clip.loss import ClipLoss

    Xi, Xt, Wi, Wt, valid = make_problem(world, masked=False)
    t0 = 2.0
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    results = []
    for impl in ("ours", "open_clip"):
        Wi_, Wt_ = Wi.float().clone().requires_grad_(), Wt.float().clone().requires_grad_()
        t = torch.tensor(t0, requires_grad=True)
        I, T = F.normalize(Xi[sl].float() @ Wi_, dim=-1), F.normalize(Xt[sl].float() @ Wt_, dim=-1)
        if impl == "ours":
            loss = clip_loss(I, T, None, t, tile_size=TILE, direct_max_slots=0)
        else:
            peer = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
            loss = peer(I, T, t.exp())
            loss_global = loss.detach().clone()
            if world > 1:
                dist.all_reduce(loss_global)
            loss_global /= world  # open_clip returns this rank's mean; ours the global loss
        loss.backward()
        grads = [Wi_.grad, Wt_.grad, t.grad]
        if world > 1:
            for g in grads:
                dist.all_reduce(g)
                g /= world
        results.append((loss.detach() if impl == "ours" else loss_global, grads))
    (l_ours, g_ours), (l_peer, g_peer) = results
    assert rel(l_ours, l_peer) < 1e-5
    for a, b in zip(g_ours, g_peer):
        assert rel(a, b) < 1e-5, rel(a, b)


def _all_checks(rank, world):
    ring = dict(tile_size=TILE, direct_max_slots=0)
    for kind in ("softmax", "sigmoid"):
        for masked in (False, True):
            _check_against_reference(rank, world, kind, masked, torch.float32, 1e-6, ring)
            _check_against_reference(rank, world, kind, masked, torch.float64, 1e-10, ring)
    _check_against_open_clip(rank, world)
    # bf16 embeddings: statistics stay float32, the loss is within 1e-3 of the float32 loss
    Xi, Xt, Wi, Wt, valid = make_problem(world, masked=True)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    I, T = F.normalize(Xi[sl] @ Wi, dim=-1).float(), F.normalize(Xt[sl] @ Wt, dim=-1).float()
    t, bias = torch.tensor(2.0), torch.tensor(-1.5)
    for fn, extra in ((clip_loss, ()), (sigmoid_loss, (bias,))):
        l32 = fn(I, T, valid[sl], t, *extra, **ring)
        l16 = fn(I.bfloat16(), T.bfloat16(), valid[sl], t, *extra, **ring)
        assert l16.dtype == torch.float32 and rel(l16, l32) < 1e-3, (fn.__name__, rel(l16, l32))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_loss_matches_references(world):
    run_world(world, _all_checks)


def _hierarchical_checks(rank, world, group_size):
    """The two-level ring against the float64 reference (as the flat ring is checked) and against
    the flat ring itself, same inputs, every gradient; both directions, padding and an empty rank."""
    two_level = dict(tile_size=TILE, direct_max_slots=0, topology="hierarchical", group_size=group_size)
    owners = [_Ring(None, "hierarchical", group_size).owner(step) for step in range(world)]
    assert owners[0] == rank and sorted(owners) == list(range(world))  # every chunk once, its own first
    for kind in ("softmax", "sigmoid"):
        for masked in (False, True):
            _check_against_reference(rank, world, kind, masked, torch.float32, 1e-6, two_level)
            _check_against_reference(rank, world, kind, masked, torch.float64, 1e-10, two_level)
            problem = (*make_problem(world, masked, seed=1), 2.5, -1.0)
            flat = ours_on_rank(kind, rank, world, *problem, tile_size=TILE, direct_max_slots=0)
            ours = ours_on_rank(kind, rank, world, *problem, **two_level)
            assert rel(ours[0], flat[0]) < 1e-6
            for a, b in zip([*ours[1], ours[2], ours[3]], [*flat[1], flat[2], flat[3]]):
                assert rel(a, b) < 1e-6, (kind, masked, rel(a, b))


@pytest.mark.parametrize("world, group_size", [(8, 4), (8, 2), (6, 2)])
def test_hierarchical_loss_equals_the_reference_and_the_flat_ring(world, group_size):
    """8 ranks as 2 nodes x 4 and 4 x 2, 6 as 3 x 2 (masked problems: uneven padding per rank and a
    last rank with no valid slot)."""
    run_world(world, _hierarchical_checks, group_size)


def test_topology_is_resolved_and_checked():
    from navit_clip.loss import resolve_topology

    assert resolve_topology("auto", 16, 8) == "hierarchical"
    assert resolve_topology("auto", 8, 8) == "ring"  # one node
    assert resolve_topology("auto", 8, 0) == "ring"  # unknown node size
    assert resolve_topology("auto", 12, 8) == "ring"  # uneven nodes
    assert resolve_topology("hierarchical", 1, 0) == "ring"  # one process: nothing travels
    with pytest.raises(ValueError, match="group_size"):
        resolve_topology("hierarchical", 8, 0)
    with pytest.raises(ValueError, match="whole nodes"):
        resolve_topology("hierarchical", 12, 8)
    with pytest.raises(ValueError, match="topology"):
        ContrastiveLoss(topology="tree")
    with pytest.raises(ValueError, match="comm_dtype"):
        ContrastiveLoss(comm_dtype="fp8")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("masked", [False, True])
def test_single_process_without_group_both_paths(kind, masked):
    assert not dist.is_initialized()
    Xi, Xt, Wi, Wt, valid = make_problem(1, masked)
    ref = reference(kind, Xi, Xt, Wi, Wt, valid, 2.0, -1.5)
    for direct_max_slots in (0, 10_000):  # tiled ring path, direct autograd path
        loss, grads, dI, dT = ours_on_rank(
            kind, 0, 1, Xi, Xt, Wi, Wt, valid, 2.0, -1.5, tile_size=TILE, direct_max_slots=direct_max_slots
        )
        assert rel(loss, ref[0]) < 1e-6
        for g, r in zip(grads, ref[1:5]):
            assert rel(g, r) < 1e-6
        assert torch.all(dI[~valid] == 0)


def test_no_valid_slot_anywhere_gives_zero_loss_and_grads():
    I = torch.randn(5, 8, requires_grad=True)
    T = torch.randn(5, 8, requires_grad=True)
    t = torch.tensor(1.0, requires_grad=True)
    for direct in (0, 100):
        loss = clip_loss(I, T, torch.zeros(5, dtype=torch.bool), t, direct_max_slots=direct)
        loss.backward()
        assert loss.item() == 0 and torch.all(I.grad == 0) and torch.isfinite(t.grad).all()
        I.grad = T.grad = t.grad = None


def test_temperature_is_clamped():
    I, T = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    big = torch.tensor(10.0, requires_grad=True)  # exp(10) > 100
    loss = clip_loss(I, T, None, big, direct_max_slots=0)
    same = clip_loss(I, T, None, torch.tensor(float(torch.log(torch.tensor(100.0)))), direct_max_slots=0)
    torch.testing.assert_close(loss, same)
    loss.backward()
    assert big.grad == 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="N_local, D"):
        clip_loss(torch.randn(4, 8), torch.randn(3, 8), None, torch.tensor(1.0))
    with pytest.raises(ValueError, match="valid mask"):
        clip_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(3, dtype=torch.bool), torch.tensor(1.0))
    with pytest.raises(ValueError, match="logit_bias"):
        ContrastiveLoss("sigmoid")(torch.randn(4, 8), torch.randn(4, 8), None, torch.tensor(1.0))


def test_readme_loss_example_runs_and_the_open_clip_convention_cannot_be_confused():
    import re
    from pathlib import Path

    from open_clip.loss import ClipLoss

    readme = (Path(__file__).parent.parent / "docs" / "loss.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "ContrastiveLoss" in b)
    scope: dict = {}
    exec(compile(code, "docs/loss.md", "exec"), scope)
    torch.testing.assert_close(scope["same"], scope["loss"])
    ref = ClipLoss()(scope["image_emb"], scope["text_emb"], scope["logit_scale"].exp())
    torch.testing.assert_close(scope["loss"], ref, rtol=1e-6, atol=1e-6)
    fresh = ContrastiveLoss("softmax")
    with pytest.raises(ValueError, match="open_clip's convention"):  # exp(t) where t belongs
        fresh(scope["image_emb"], scope["text_emb"], scope["valid"], scope["logit_scale"].exp())
    with pytest.raises(ValueError, match="not both"):
        fresh(scope["image_emb"], scope["text_emb"], scope["valid"], scope["logit_scale"], scale=14.0)


def late_training_problem(n: int = 600, dim: int = 256):
    """Normalised, correlated float64 embeddings at scale 95 (logits 30-90, loss ~0.3), every 7th slot
    padding: what the loss sees late in training."""
    import math

    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    I64, T64 = (
        F.normalize(base + 1.6 * torch.randn(n, dim, generator=g, dtype=torch.float64) / dim**0.5, dim=-1)
        for _ in range(2)
    )
    valid = torch.ones(n, dtype=torch.bool)
    valid[::7] = False
    return I64, T64, valid, torch.tensor(math.log(95.0), dtype=torch.float64)


def loss_and_grads(fn, I, T, t):
    I, T, t = (x.clone().requires_grad_() for x in (I, T, t))
    loss = fn(I, T, t)
    loss.backward()
    return loss.detach(), I.grad, T.grad, t.grad


def late_training_reference():
    I64, T64, valid, t64 = late_training_problem()
    return loss_and_grads(lambda I, T, t: naive_clip(I, T, valid, t), I64, T64, t64)


# Both float32 paths take logits relative to the positives, s (<I_i, T_j> - <I_i, T_i>), with the positive
# rounded once from float64: here loss 0.2-3e-7, dI/dT 1.1-1.3e-6, dt 0.3-5e-7 of float64 (over seeds 0-3).
# Uncentred, the temperature's gradient was 4-5e-6 off on the direct path and 5-8e-6 on the ring.
LATE_TOL = (1e-6, 2e-6, 2e-6, 2e-6)
DIRECT_TOL = 2e-6  # tiled (any tile, any world size) against the direct path, both float32


def rel_all(got, want):
    return [float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(got, want)]


def late_training_direct():
    I64, T64, valid, t64 = late_training_problem()
    return loss_and_grads(lambda I, T, t: clip_loss(I, T, valid, t), I64.float(), T64.float(), t64.float())


@pytest.mark.parametrize("tile", [97, 128, 600])
def test_tiled_loss_keeps_float32_accuracy_at_late_training_temperatures(tile):
    """The tiled path's loss was 1e-5 off a float64 reference (LSEs and positives summed separately,
    in float32), its temperature gradient 3e-6 off the direct path's. Centred logits, the positives
    rounded once, (max, sum) statistics and per-tile float64 sums: as accurate as the direct path
    and equal to it within 2e-6, with tiles that straddle the padding and the matrix's edge."""
    I64, T64, valid, t64 = late_training_problem()
    got = loss_and_grads(
        lambda I, T, t: clip_loss(I, T, valid, t, tile_size=tile, direct_max_slots=0),
        I64.float(),
        T64.float(),
        t64.float(),
    )
    to_f64 = rel_all(got, late_training_reference())
    assert all(r < tol for r, tol in zip(to_f64, LATE_TOL)), to_f64
    to_direct = rel_all(got, late_training_direct())
    assert max(to_direct) < DIRECT_TOL, to_direct


def test_direct_loss_keeps_float32_accuracy_at_late_training_temperatures():
    to_f64 = rel_all(late_training_direct(), late_training_reference())
    assert all(r < tol for r, tol in zip(to_f64, LATE_TOL)), to_f64


def _late_training_on_ranks(rank, world, direct):
    I64, T64, valid, t64 = late_training_problem()
    ref = late_training_reference()
    sl = slice(rank * len(valid) // world, (rank + 1) * len(valid) // world)
    loss, dI, dT, dt = loss_and_grads(
        lambda I, T, t: clip_loss(I, T, valid[sl], t, tile_size=128, direct_max_slots=0),
        I64[sl].float(),
        T64[sl].float(),
        t64.float(),
    )
    dist.all_reduce(dt)  # what DDP does to a replicated parameter: the mean over ranks
    got = (loss, dI / world, dT / world, dt / world)
    for want, tols in ((ref, LATE_TOL), (direct, (DIRECT_TOL,) * 4)):
        rel_ = rel_all(got, (want[0], want[1][sl], want[2][sl], want[3]))
        assert all(r < tol for r, tol in zip(rel_, tols)), (rank, world, rel_)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_loss_keeps_float32_accuracy_at_late_training_temperatures(world):
    """The same late-training problem split over 2-4 gloo ranks (150-300 slots each, tiles of 128
    straddling the rank boundaries, padding on every rank): the ring is as accurate as one process."""
    run_world(world, _late_training_on_ranks, late_training_direct())  # direct: one process, no group


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("direct_max_slots", [2048, 0])
def test_loss_runs_in_float32_inside_bf16_autocast(kind, direct_max_slots):
    """Training with precision=bf16 calls the loss inside autocast. The loss was computed from bf16
    logits there (direct path: gradients 1.3e-2 off), and the ring raised (its backward, outside
    autocast, mixed float32 and bf16). Now identical to the float32 call."""
    I64, T64, valid, t64 = late_training_problem(n=200)
    bias = torch.tensor(-10.0)

    def fn(I, T, t):
        if kind == "sigmoid":
            return sigmoid_loss(I, T, valid, t, bias, tile_size=64, direct_max_slots=direct_max_slots)
        return clip_loss(I, T, valid, t, tile_size=64, direct_max_slots=direct_max_slots)

    def under_autocast(I, T, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(I, T, t)

    inputs = (I64.float(), T64.float(), t64.float())
    plain, mixed = loss_and_grads(fn, *inputs), loss_and_grads(under_autocast, *inputs)
    for a, b in zip(mixed, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _bf16_chunks_check(rank, world):
    """comm_dtype=bf16 on a two-level ring of 2 x 2 ranks is one function with the one-process loss
    of the same option (text rounded to bf16 everywhere), and near the float32 loss."""
    alone = [dist.new_group([r]) for r in range(world)][rank]
    Xi, Xt, Wi, Wt, valid = make_problem(world, masked=True)
    t0 = 2.0
    W1i, W1t = Wi.float().clone().requires_grad_(), Wt.float().clone().requires_grad_()
    t1 = torch.tensor(t0, requires_grad=True)
    I, T = F.normalize(Xi.float() @ W1i, dim=-1), F.normalize(Xt.float() @ W1t, dim=-1)
    one = clip_loss(I, T, valid, t1, group=alone, comm_dtype="bf16")  # the direct path
    one.backward()
    full = clip_loss(I.detach(), T.detach(), valid, t1.detach(), group=alone)  # float32 chunks
    opts = dict(tile_size=TILE, direct_max_slots=0, topology="hierarchical", group_size=2, comm_dtype="bf16")
    loss, grads, _, dT = ours_on_rank("softmax", rank, world, Xi, Xt, Wi, Wt, valid, t0, 0.0, **opts)
    assert rel(loss, one) < 1e-6, rel(loss, one)
    for g, want in zip(grads, (W1i.grad, W1t.grad, t1.grad)):
        assert rel(g, want) < 1e-5, rel(g, want)
    assert 0 < rel(loss, full) < 1e-2  # bf16 chunks change the loss, a little


def test_bf16_chunks_are_one_function_on_any_topology():
    run_world(4, _bf16_chunks_check)
