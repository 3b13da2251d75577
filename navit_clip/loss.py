"""Exact global contrastive losses (CLIP softmax and SigLIP sigmoid), chunked around a ring of ranks.

Neither the global N x N nor the local b x N logit matrix is ever built: every rank keeps its image
embeddings, text chunks travel around the ring (send to rank+1, receive from rank-1) in tiles, and
the backward pass recomputes tiles instead of saving them. Memory saved for backward is O(b * D).

Topologies (`topology`): `ring`, one ring of all W ranks: W - 1 sequential hops, each of which, in a
job over several nodes, crosses a node boundary somewhere and waits on the network's latency.
`hierarchical`, a two-level ring for W = nodes x g ranks (g per node, consecutive ranks): the chunks a
rank holds go once around its node's ring (g - 1 hops over the fast link), then move on, all g of a
node's chunks at once, one per rank, to the same local rank of the next node (one inter-node hop),
nodes times; nodes - 1 inter-node hops in all, each carrying one node's block, and the inter-node
transfer overlaps the intra-node ring. The column statistics (forward) and text gradients (backward)
travel with their chunk either way, one step behind it (no rank waits on its neighbour's visit), and
end with its owner. Both compute the same sums in a different
order: equal within float32 rounding.

Shape legend: b local slots, D embedding width, t rows/columns of one tile, W world size,
N valid slots in the global batch (all ranks).

Math (softmax), with s = exp(logit_scale) clamped to max_scale:
    z_ij = s <I_i, T_j>,  a_i = logsumexp_j z_ij,  c_j = logsumexp_i z_ij
    L = 1/(2N) [sum_i (a_i - z_ii) + sum_j (c_j - z_jj)]
    G_ij = (exp(z_ij - a_i) + exp(z_ij - c_j) - 2 delta_ij) / (2N)
    dL/dI_i = s sum_j G_ij T_j,  dL/dT_j = s sum_i G_ij I_i,  dL/ds = sum_ij G_ij <I_i, T_j>
In float32 every softmax runs over logits centred on its positive (z_ij - z_ii for row i, z_ij - z_jj
for column j; the same probabilities), which turns a_i - z_ii and dL/ds into sums of small terms.
The loss imports no model code: it sees embeddings, a validity mask and the temperature.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

NEG_INF = float("-inf")


TOPOLOGIES = ("ring", "hierarchical", "auto")
_node_groups: dict[tuple, tuple] = {}


class _Ring:
    """Point-to-point neighbours of this rank in `group` (or a single process with no group), and how
    chunks go around all ranks (`around`): this ring, or the two levels `inner` (the node) and `outer`
    (the same local rank on every node) of a hierarchical topology."""

    level = "ring"  # which link a ring's hops take: ring (flat), node (intra-node), nodes (inter-node)
    inner: _Ring | None = None
    outer: _Ring | None = None

    def __init__(self, group: dist.ProcessGroup | None, topology: str = "ring", group_size: int = 0):
        if group is None and not (dist.is_available() and dist.is_initialized()):
            self.group, self.rank, self.world = None, 0, 1
            return
        self.group = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world)
        if resolve_topology(topology, self.world, group_size) == "hierarchical":
            inner, outer = _levels(self.group, self.world, group_size)
            self.inner, self.outer = _Ring(inner), _Ring(outer)
            self.inner.level, self.outer.level = "node", "nodes"

    def around(self, chunk: list[torch.Tensor], visit, merge) -> list[torch.Tensor]:
        """Every rank visits every rank's chunk once (`visit(step, chunk)`, step 0 its own), which
        returns its share of the chunk's carry (statistics, gradients); `merge(a, b)` combines two
        shares. The merged carry of every rank's visits ends with the chunk's owner (see
        `_ring_pass`, `_two_level_pass`)."""
        if self.inner is None:
            return _ring_pass(self, chunk, visit, merge)
        return _two_level_pass(self.outer, self.inner, chunk, visit, merge)

    def start_shift(self, tensors: list[torch.Tensor], first_tag: int = 0) -> tuple[list[torch.Tensor], list]:
        """Post sends of `tensors` to rank+1 and receives of the same shapes from rank-1.

        Every tensor in flight at once gets its own tag, so messages can never be matched crosswise.
        """
        received = [torch.empty_like(t) for t in tensors]
        works = []
        for tag, (out, into) in enumerate(zip(tensors, received), start=first_tag):
            works.append(dist.isend(out.contiguous(), self.next, group=self.group, tag=tag))
            works.append(dist.irecv(into, self.prev, group=self.group, tag=tag))
        return received, works

    def shift(self, tensors: list[torch.Tensor], first_tag: int = 0) -> list[torch.Tensor]:
        received, works = self.start_shift(tensors, first_tag)
        for w in works:
            w.wait()
        return received

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def owner(self, step: int) -> int:
        """The rank (in the group) whose chunk this rank visits at `step` of `around`."""
        if self.inner is None:
            return (self.rank - step) % self.world
        g, nodes = self.inner.world, self.outer.world
        (node, local), (k, j) = divmod(self.rank, g), divmod(step, g)
        return (node - k) % nodes * g + (local - j) % g

    def valid_counts(self, valid_b: torch.Tensor) -> tuple[int, ...]:
        """Every rank's number of valid slots (N is their sum); checks every rank has the same b."""
        # On the slots' device (NCCL moves only GPU tensors); reading the result is one small host sync.
        counts = torch.stack([torch.tensor(valid_b.numel(), device=valid_b.device), valid_b.sum()]).long()
        if self.world == 1:
            return (int(counts[1]),)
        gathered = [torch.empty_like(counts) for _ in range(self.world)]
        dist.all_gather(gathered, counts, group=self.group)
        sizes = {int(g[0]) for g in gathered}
        if len(sizes) != 1:
            raise ValueError(
                f"every rank must pass the same number of slots to the loss; got {sorted(sizes)}"
            )
        return tuple(int(g[1]) for g in gathered)


def resolve_topology(topology: str, world: int, group_size: int) -> str:
    """`ring` or `hierarchical` for `world` ranks in nodes of `group_size` (0: unknown). `auto` is
    hierarchical when the ranks span more than one node of more than one rank."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"loss topology={topology!r} is not one of {TOPOLOGIES}")
    if topology == "ring" or world == 1:
        return "ring"
    if group_size < 1:
        if topology == "auto":
            return "ring"
        raise ValueError(
            "loss.topology=hierarchical needs the ranks per node: run under torchrun (LOCAL_WORLD_SIZE) "
            "or set loss.group_size"
        )
    if world % group_size:
        if topology == "auto":  # nodes of different sizes: the flat ring serves them all
            return "ring"
        raise ValueError(
            f"loss.group_size={group_size} does not divide the {world} ranks into whole nodes; set "
            "loss.group_size to the ranks per node, or loss.topology=ring"
        )
    if topology == "auto" and not (1 < group_size < world):
        return "ring"
    return "hierarchical"


def _levels(group: dist.ProcessGroup, world: int, g: int) -> tuple:
    """This rank's node group (g consecutive ranks of `group`) and its peers group (the ranks with
    its local index on every node), made once per (ranks, g) and reused. Only the member ranks make
    each group (use_local_synchronization), so `group` may be any subgroup."""
    ranks = tuple(dist.get_global_rank(group, i) for i in range(world))
    key = (ranks, g)
    if key not in _node_groups:
        me = dist.get_rank(group)
        node, local = divmod(me, g)
        inner = dist.new_group(list(ranks[node * g : (node + 1) * g]), use_local_synchronization=True)
        outer = dist.new_group(list(ranks[local::g]), use_local_synchronization=True)
        _node_groups[key] = (inner, outer)
    return _node_groups[key]


_CARRY_TAG, _OUTER_TAG = 16, 32  # tags of the carries and of the outer level (chunks use 0, 1, ...)


def _two_level_pass(outer: _Ring, inner: _Ring, chunk, visit, merge) -> list[torch.Tensor]:
    """`_ring_pass` over nodes x g ranks: at outer step k this rank holds the chunk of its local
    peer on node - k; that chunk goes around the node's ring, every rank of the node visiting it,
    and meanwhile (overlapped) the chunk is sent on to the next node. After the inner pass the
    node's share of the carry is with the holder; merged with the shares of the nodes before, it
    follows the chunk. Step numbers k * g + j (j the inner step) are 0 for this rank's own chunk only."""
    g, carry = inner.world, None
    for k in range(outer.world):
        last = k == outer.world - 1
        if not last:
            incoming, works = outer.start_shift(chunk, first_tag=_OUTER_TAG)
        node = _ring_pass(inner, chunk, lambda j, c, k=k: visit(k * g + j, c), merge)
        carry = node if carry is None else merge(carry, node)
        if outer.world > 1:
            carry = outer.shift(carry, first_tag=_OUTER_TAG + _CARRY_TAG)
        if not last:
            for w in works:
                w.wait()
            chunk = incoming
    return carry


def _ring_pass(
    ring: _Ring,
    chunk: list[torch.Tensor],
    visit: Callable[[int, list[torch.Tensor]], list[torch.Tensor]],
    merge: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]],
) -> list[torch.Tensor]:
    """Move `chunk` (read-only) once around the ring, and with it the carry: the merge of every
    rank's `visit` of it.

    At step k this rank visits the chunk owned by rank - k. The chunk for the next step is received
    while `visit` computes. The carry travels one step behind: a rank computes its share first, then
    merges it into the carry its neighbour sent after the previous step and sends the result on
    without waiting for it to arrive; the next visit overlaps that hop. So no rank waits for its
    neighbour's visit of the same step (the lockstep that, on busy or oversubscribed cores, turned
    every neighbour's delay into everyone's). After W steps the carry is with the chunk's owner.
    """
    carry, hop = None, None
    for step in range(ring.world):
        last = step == ring.world - 1
        if not last:
            incoming, works = ring.start_shift(chunk)
        share = visit(step, chunk)
        carry = share if hop is None else merge(_arrived(hop), share)
        if ring.world > 1:
            hop = ring.start_shift(carry, first_tag=_CARRY_TAG)
        if not last:
            for w in works:
                w.wait()
            chunk = incoming
    return carry if hop is None else _arrived(hop)


def _arrived(hop: tuple[list[torch.Tensor], list]) -> list[torch.Tensor]:
    received, works = hop
    for w in works:
        w.wait()
    return received


def _merge_max_sum(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """Two shares (m, S) of online softmax statistics (see `_fold`) as one."""
    (m_a, S_a), (m_b, S_b) = a, b
    m = torch.maximum(m_a, m_b)
    shift = torch.where(torch.isinf(m), 0.0, m)  # columns no rank has folded yet: -inf and 0
    return [m, S_a * torch.exp(m_a - shift) + S_b * torch.exp(m_b - shift)]


def _merge_sum(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x + y for x, y in zip(a, b)]


def _tiles(n: int, tile: int):
    for start in range(0, n, tile):
        yield slice(start, min(start + tile, n))


def _diagonal(rows: slice, cols: slice, device):
    """The (i, r, c) of the diagonal entries i == j inside a tile: slot i at tile row r, column c
    (empty when the tile misses the diagonal)."""
    lo, hi = max(rows.start, cols.start), min(rows.stop, cols.stop)
    if lo >= hi:
        return []
    i = torch.arange(lo, hi, device=device)
    return [(i, i - rows.start, i - cols.start)]


def _valid_first(img_bD, txt_bD, valid_b, count: int) -> tuple[torch.Tensor, ...]:
    """The slots reordered (a differentiable gather) so that the `count` valid ones come first, in
    their order. The ring's tiles then span a rank's first `count` rows and a chunk's first
    `counts[owner]` columns: padding is never computed on nor masked, and its gradient is exactly 0."""
    if count == valid_b.numel():  # no padding (checking whether it already trails costs a host sync)
        return img_bD, txt_bD, valid_b
    order = torch.argsort((~valid_b).to(torch.uint8), stable=True)
    return img_bD[order], txt_bD[order], valid_b[order]


def _acc(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Upcast to the accumulation dtype: float32, or float64 when an input already is."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def _fold(m_b: torch.Tensor, S_b: torch.Tensor, z_tt: torch.Tensor, dim: int) -> None:
    """Online softmax statistics along `dim`: fold a tile into the running max m and the sum
    S = sum exp(z - m), in place. Kept apart rather than as one log-sum-exp m + log S: near
    late-training logits (~90) a float32 LSE carries only ~8e-6 of absolute precision, which would
    scale every probability of the row by (1 +- 8e-6) and bias the temperature's gradient."""
    m_new = torch.maximum(m_b, z_tt.amax(dim))
    shift = torch.where(torch.isinf(m_new), 0.0, m_new)  # rows of padding only: everything -inf
    S_b.mul_(torch.exp(m_b - shift)).add_(torch.exp(z_tt - shift.unsqueeze(dim)).sum(dim))
    m_b.copy_(m_new)


def _probs(z_tt: torch.Tensor, m: torch.Tensor, log_S: torch.Tensor) -> torch.Tensor:
    """exp(z - m - log S), with z - m exact (close float32 numbers) and log S small; in place in z."""
    return z_tt.sub_(m).sub_(log_S).exp_()


def _centred(diff_tt, s, out: torch.Tensor | None = None) -> torch.Tensor:
    """The centred logits s (dot - positive) from the differences `diff_tt`, into `out` (`diff_tt`
    itself to work in place; a new tile if None)."""
    return torch.mul(diff_tt, s, out=out) if out is not None else diff_tt * s


def _positives(I_bD: torch.Tensor, T_bD: torch.Tensor) -> torch.Tensor:
    """<I_i, T_i>, summed in float64 and rounded once: every logit is taken relative to these."""
    return (I_bD.double() * T_bD.double()).sum(1).to(I_bD.dtype)


def _dots(I_bD, Tc_bD, rows: slice, cols: slice, pos_b: torch.Tensor | None) -> torch.Tensor:
    """One tile of <I_i, T_j>; on this rank's own chunk (`pos_b` given) the diagonal entries are the
    positives themselves, so a positive's centred logit is exactly 0."""
    dot_tt = I_bD[rows] @ Tc_bD[cols].T
    if pos_b is not None:
        for i, r, c in _diagonal(rows, cols, dot_tt.device):
            dot_tt[r, c] = pos_b[i]
    return dot_tt


class _SoftmaxRing(torch.autograd.Function):
    """Logits are centred on the positives before the temperature multiplies them: row i's softmax
    runs over s (<I_i, T_j> - <I_i, T_i>), column j's over s (<I_i, T_j> - <I_j, T_j>). The softmax
    is unchanged, the loss per slot is directly m + log S (no large LSE minus a large positive),
    and dL/ds = sum_ij P_ij (<I_i, T_j> - <I_i, T_i>) + (the columns' term) / 2N has no cancellation:
    the positive's own term is exactly 0 and the dominant near-positives are small differences."""

    @staticmethod
    def forward(ctx, img_bD, txt_bD, valid_b, scale, ring: _Ring, tile: int, counts: tuple, comm=None):
        I_bD, T_bD, s = _acc(img_bD, _as_sent(txt_bD, comm), scale)
        row_m_b = torch.full((I_bD.shape[0],), NEG_INF, dtype=I_bD.dtype, device=I_bD.device)
        row_S_b = torch.zeros_like(row_m_b)
        pos_b = _positives(I_bD, T_bD)
        n_global = max(sum(counts), 1)

        def visit(step, chunk):
            Tc_bD, pos_c_b = chunk
            Tc_bD = Tc_bD.to(I_bD.dtype)
            col_m_b, col_S_b = torch.full_like(row_m_b, NEG_INF), torch.zeros_like(row_S_b)
            for rows in _tiles(counts[ring.rank], tile):
                for cols in _tiles(counts[ring.owner(step)], tile):
                    dot_tt = _dots(I_bD, Tc_bD, rows, cols, pos_b if step == 0 else None)
                    z_tt = dot_tt - pos_b[rows, None]
                    _fold(row_m_b[rows], row_S_b[rows], _centred(z_tt, s, out=z_tt), 1)
                    z_tt = _centred(torch.sub(dot_tt, pos_c_b[None, cols], out=z_tt), s, out=z_tt)
                    _fold(col_m_b[cols], col_S_b[cols], z_tt, 0)
            return [col_m_b, col_S_b]

        col_m_b, col_S_b = ring.around([_sent(T_bD, comm), pos_b], visit, _merge_max_sum)
        # Per slot, LSE - positive = m + log S of the centred logits: small numbers, summed in float64.
        row_log_S, col_log_S = row_S_b.log(), col_S_b.log()
        per_slot_b = (row_m_b + row_log_S + col_m_b + col_log_S)[valid_b]
        local = (per_slot_b.double().sum() / (2 * n_global)).to(I_bD.dtype)
        loss = ring.all_reduce_sum(local.detach().clone())
        # Padding slots (never read again: the tiles skip them): finite placeholders.
        ctx.save_for_backward(
            img_bD,
            txt_bD,
            valid_b,
            scale,
            *(x.masked_fill(~valid_b, 0) for x in (row_m_b, row_log_S, col_m_b, col_log_S)),
        )
        ctx.ring, ctx.tile, ctx.counts, ctx.comm = ring, tile, counts, comm
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        img_bD, txt_bD, valid_b, scale, row_m_b, row_log_S, col_m_b, col_log_S = ctx.saved_tensors
        ring, tile, counts, comm = ctx.ring, ctx.tile, ctx.counts, ctx.comm
        n = max(sum(counts), 1)
        I_bD, T_bD, s = _acc(img_bD, _as_sent(txt_bD, comm), scale)
        pos_b = _positives(I_bD, T_bD)
        dI_bD = torch.zeros_like(I_bD)
        own_b = valid_b.to(I_bD.dtype) / n
        pd = torch.zeros((), dtype=torch.float64, device=I_bD.device)  # sum_ij (P_ij Dr_ij + Q_ij Dc_ij)

        def visit(step, chunk):
            nonlocal pd
            Tc_bD, pos_c_b, col_m_c_b, col_log_S_c_b = chunk
            Tc_bD = Tc_bD.to(I_bD.dtype)
            dTc_bD = torch.zeros_like(T_bD)
            for rows in _tiles(counts[ring.rank], tile):
                for cols in _tiles(counts[ring.owner(step)], tile):
                    # the centred logits exactly as the forward computed them (same products, same tiles)
                    dot_tt = _dots(I_bD, Tc_bD, rows, cols, pos_b if step == 0 else None)
                    # P (rows' softmax) and Q (columns'), each from its centred logits; the products
                    # P (dot - positive) for dL/ds are taken in place: four tiles alive at most.
                    diff_tt = dot_tt - pos_b[rows, None]
                    P_tt = _probs(_centred(diff_tt, s), row_m_b[rows, None], row_log_S[rows, None])
                    pd += diff_tt.mul_(P_tt).sum(dtype=torch.float64)
                    torch.sub(dot_tt, pos_c_b[None, cols], out=diff_tt)
                    Q_tt = _probs(_centred(diff_tt, s), col_m_c_b[None, cols], col_log_S_c_b[None, cols])
                    pd += diff_tt.mul_(Q_tt).sum(dtype=torch.float64)
                    del diff_tt, dot_tt
                    G_tt = P_tt.add_(Q_tt).div_(2 * n)
                    del Q_tt
                    if step == 0:  # the -2 delta_ij / (2N) of the positives
                        for i, r, c in _diagonal(rows, cols, G_tt.device):
                            G_tt[r, c] -= own_b[i]
                    dI_bD[rows] += G_tt @ Tc_bD[cols]
                    dTc_bD[cols] += G_tt.T @ I_bD[rows]
            return [dTc_bD]

        chunk = [_sent(T_bD, comm), pos_b, col_m_b, col_log_S]
        (dT_bD,) = ring.around(chunk, visit, _merge_sum)
        # dL/ds from the centred differences: no cancellation, ~1e-6 of a float64 reference at
        # late-training temperatures (uncentred, summed from the logits: 4-8e-6).
        ds = pd / (2 * n)
        # DDP/FSDP average gradients over ranks; scaling by W makes the average the global gradient.
        g = grad_loss.to(I_bD.dtype) * ring.world
        dI_bD, dT_bD, ds = dI_bD * (s * g), dT_bD * (s * g), ds.to(I_bD.dtype) * g
        return (
            dI_bD.to(img_bD.dtype),
            dT_bD.to(txt_bD.dtype),
            None,
            ds.to(scale.dtype).reshape(scale.shape),
            None,
            None,
            None,
            None,
        )


class _SigmoidRing(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, img_bD, txt_bD, valid_b, scale, logit_bias, ring: _Ring, tile: int, counts: tuple, comm=None
    ):
        I_bD, T_bD, s, beta = _acc(img_bD, _as_sent(txt_bD, comm), scale, logit_bias)
        total = torch.zeros((), dtype=I_bD.dtype, device=I_bD.device)
        Is_bD = I_bD * s

        def visit(step, chunk):
            nonlocal total
            (Tc_bD,) = chunk
            Tc_bD = Tc_bD.to(I_bD.dtype)
            for rows in _tiles(counts[ring.rank], tile):
                for cols in _tiles(counts[ring.owner(step)], tile):
                    # -log sigmoid(-x) = softplus(x) for every (negative) pair
                    total += F.softplus(Is_bD[rows] @ Tc_bD[cols].T + beta).sum()
            return []

        ring.around([_sent(T_bD, comm)], visit, _merge_sum)
        # Positive pairs: softplus(-x) - softplus(x) = -x corrects the diagonal, which was counted as negative.
        diag_b = (Is_bD * T_bD).sum(1) + beta
        local = (total - diag_b[valid_b].sum()) / max(sum(counts), 1)
        loss = ring.all_reduce_sum(local.detach().clone())
        ctx.save_for_backward(img_bD, txt_bD, valid_b, scale, logit_bias)
        ctx.ring, ctx.tile, ctx.counts, ctx.comm = ring, tile, counts, comm
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        img_bD, txt_bD, valid_b, scale, logit_bias = ctx.saved_tensors
        ring, tile, counts, comm = ctx.ring, ctx.tile, ctx.counts, ctx.comm
        n = max(sum(counts), 1)
        I_bD, T_bD, s, beta = _acc(img_bD, _as_sent(txt_bD, comm), scale, logit_bias)
        dI_bD = torch.zeros_like(I_bD)
        ds = torch.zeros((), dtype=I_bD.dtype, device=I_bD.device)
        dbeta = torch.zeros((), dtype=I_bD.dtype, device=I_bD.device)

        def visit(step, chunk):
            nonlocal ds, dbeta
            (Tc_bD,) = chunk
            Tc_bD = Tc_bD.to(I_bD.dtype)
            dTc_bD = torch.zeros_like(T_bD)
            for rows in _tiles(counts[ring.rank], tile):
                for cols in _tiles(counts[ring.owner(step)], tile):
                    dot_tt = I_bD[rows] @ Tc_bD[cols].T
                    G_tt = torch.sigmoid(dot_tt * s + beta) / n  # d softplus(x)/dx
                    dI_bD[rows] += G_tt @ Tc_bD[cols]
                    dTc_bD[cols] += G_tt.T @ I_bD[rows]
                    ds += (G_tt * dot_tt).sum()
                    dbeta += G_tt.sum()
            return [dTc_bD]

        (dT_bD,) = ring.around([_sent(T_bD, comm)], visit, _merge_sum)
        v_b1 = valid_b[:, None].to(I_bD.dtype)
        dI_bD -= T_bD * v_b1 / n
        dT_bD -= I_bD * v_b1 / n
        ds -= (I_bD * T_bD * v_b1).sum() / n
        dbeta -= valid_b.sum().to(I_bD.dtype) / n
        g = grad_loss.to(I_bD.dtype) * ring.world
        return (
            (dI_bD * (s * g)).to(img_bD.dtype),
            (dT_bD * (s * g)).to(txt_bD.dtype),
            None,
            (ds * g).to(scale.dtype).reshape(scale.shape),
            (dbeta * g).to(logit_bias.dtype).reshape(logit_bias.shape),
            None,
            None,
            None,
            None,
        )


COMM_DTYPES = {"float32": None, "bf16": torch.bfloat16}


def _as_sent(txt_bD: torch.Tensor, comm: torch.dtype | None) -> torch.Tensor:
    """The text embeddings as every rank sees them: rounded to the dtype chunks travel in (comm), on
    the owner too, so that every tile of every rank is computed from the same values and the forward,
    backward and all ranks agree. Unchanged when chunks travel in their own dtype."""
    return txt_bD if comm is None or txt_bD.dtype == comm else txt_bD.to(comm)


def _sent(T_bD: torch.Tensor, comm: torch.dtype | None) -> torch.Tensor:
    """What goes on the wire: the (already rounded) embeddings in `comm`, half the bytes for bf16;
    the receiver computes its tiles in the accumulation dtype (`Tc_bD.to(I_bD.dtype)`)."""
    return T_bD if comm is None else T_bD.to(comm)


def _comm(comm_dtype: str) -> torch.dtype | None:
    if comm_dtype not in COMM_DTYPES:
        raise ValueError(f"loss comm_dtype={comm_dtype!r} is not one of {tuple(COMM_DTYPES)}")
    return COMM_DTYPES[comm_dtype]


def _rounded(txt_bD: torch.Tensor, comm: torch.dtype | None) -> torch.Tensor:
    """`_as_sent` for the autograd path: rounded values, the float32 gradient passed straight through
    (as the ring's backward passes it; a plain cast would round the gradient to bf16 too)."""
    if comm is None:
        return txt_bD
    return txt_bD + (txt_bD.to(comm).to(txt_bD.dtype) - txt_bD).detach()


def _direct_clip_loss(img_bD, txt_bD, valid_b, scale) -> torch.Tensor:
    """Single-process softmax loss with ordinary autograd (small batches: one matrix is cheap).

    Centred like the ring: logsumexp_j s (<I_i, T_j> - <I_i, T_i>), so autograd's dL/ds sums small
    differences (cross_entropy over s <I_i, T_j> left 4-5e-6 of error on it at scale ~95)."""
    I_nD, T_nD = img_bD[valid_b].float(), txt_bD[valid_b].float()
    if I_nD.shape[0] == 0:
        return (img_bD.sum() + txt_bD.sum() + scale).float() * 0
    dot_nn = I_nD @ T_nD.T
    pos_n = _positives(I_nD, T_nD)
    dot_nn.diagonal().copy_(pos_n)  # the positives rounded once, as the ring takes them
    s = scale.float()
    rows_n = torch.logsumexp(s * (dot_nn - pos_n[:, None]), 1)
    cols_n = torch.logsumexp(s * (dot_nn - pos_n[None, :]), 0)
    return (rows_n.mean() + cols_n.mean()) / 2


def _direct_sigmoid_loss(img_bD, txt_bD, valid_b, scale, logit_bias) -> torch.Tensor:
    I_nD, T_nD = img_bD[valid_b].float(), txt_bD[valid_b].float()
    n = I_nD.shape[0]
    if n == 0:
        return (img_bD.sum() + txt_bD.sum() + scale + logit_bias).float() * 0  # 0-d, zero gradients
    x_nn = scale.float() * I_nD @ T_nD.T + logit_bias.float()
    y_nn = 2 * torch.eye(n, device=x_nn.device) - 1
    return -F.logsigmoid(y_nn * x_nn).sum() / n


def _no_autocast(x: torch.Tensor):
    """The loss runs in float32 even inside a bf16 autocast region: at late-training scales (~100) a
    bf16 logit is off by ~0.4, and the ring's backward (which autocast does not reach) recomputes the
    logits it must agree with."""
    return torch.autocast(x.device.type, enabled=False)


def _check_inputs(img_bD, txt_bD, valid_b) -> torch.Tensor:
    if img_bD.ndim != 2 or img_bD.shape != txt_bD.shape:
        raise ValueError(
            f"image and text embeddings must both be [N_local, D]; got {tuple(img_bD.shape)} and {tuple(txt_bD.shape)}"
        )
    if valid_b is None:
        return torch.ones(img_bD.shape[0], dtype=torch.bool, device=img_bD.device)
    if valid_b.shape != img_bD.shape[:1]:
        raise ValueError(f"valid mask must be [N_local]={img_bD.shape[0]}; got {tuple(valid_b.shape)}")
    return valid_b.bool()


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    valid: torch.Tensor | None,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    tile_size: int = 1024,
    max_scale: float = 100.0,
    direct_max_slots: int = 2048,
    topology: str = "ring",
    group_size: int = 0,
    comm_dtype: str = "float32",
) -> torch.Tensor:
    """Exact symmetric CLIP loss over the global batch of every rank in `group`.

    Args:
        image_emb, text_emb: [N_local, D] embeddings of this rank (any float dtype; the logits, LSEs
            and gradient accumulators are float32 with max subtraction). Pair i is (image i, text i).
            Every rank must pass the same N_local.
        valid: [N_local] bool, False for padding slots (excluded from statistics and from N, and
            from every tile: the valid slots are gathered first; their gradient is exactly zero). None means all valid. A rank may have no valid slot.
        logit_scale: the learnable temperature in log space, as open_clip's `logit_scale`;
            s = exp(logit_scale) is clamped to `max_scale`.
        group: process group (default: the default group if one is initialised, else one process).
        tile_size: rows/columns of one logit tile; bounds the transient memory to tile_size^2 floats.
        direct_max_slots: in a single process with at most this many slots, ordinary autograd over
            the b x b matrix is used (faster for small batches); otherwise the tiled path.
        topology: `ring`, `hierarchical` (two levels: nodes of `group_size` consecutive ranks; see the
            module's docstring) or `auto` (hierarchical over more than one node).
        group_size: ranks per node for the hierarchical topology (0: not known; `ContrastiveLoss`
            reads torchrun's LOCAL_WORLD_SIZE).
        comm_dtype: `float32` (exact), or `bf16`: text chunks travel in bfloat16 (half the bytes),
            tiles and statistics stay float32; the text embeddings enter the loss rounded to bf16 on
            every rank and path (one process too), so all ranks compute one function.
    Returns:
        The global loss (the same value on every rank).

    Gradient scale: every rank's gradients are W times its share, so that after the mean all-reduce
    DDP and FSDP apply to replicated parameters, each gradient (the temperature's included) equals
    the gradient of the single-process loss over the global batch. Do not all-reduce the temperature
    gradient yourself; without DDP/FSDP averaging, divide gradients by W.
    """
    valid = _check_inputs(image_emb, text_emb, valid)
    ring, comm = _Ring(group, topology, group_size), _comm(comm_dtype)
    scale = logit_scale.exp().clamp(max=max_scale).reshape(())  # open_clip-style 0-d or FSDP-style [1]
    with _no_autocast(image_emb):
        if ring.world == 1 and image_emb.shape[0] <= direct_max_slots:
            return _direct_clip_loss(image_emb, _rounded(text_emb, comm), valid, scale)
        counts = ring.valid_counts(valid)
        img, txt, valid = _valid_first(image_emb, text_emb, valid, counts[ring.rank])
        return _SoftmaxRing.apply(img, txt, valid, scale, ring, tile_size, counts, comm)


def sigmoid_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    valid: torch.Tensor | None,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    tile_size: int = 1024,
    max_scale: float = 100.0,
    direct_max_slots: int = 2048,
    topology: str = "ring",
    group_size: int = 0,
    comm_dtype: str = "float32",
) -> torch.Tensor:
    """Exact SigLIP loss -(1/N) sum_ij log sigmoid(y_ij (s <I_i, T_j> + bias)) over the global batch.

    y_ij = +1 for matching pairs and -1 otherwise. Same arguments, ring, tiling and gradient-scale
    convention as `clip_loss`, plus the learnable `logit_bias`.
    """
    valid = _check_inputs(image_emb, text_emb, valid)
    ring, comm = _Ring(group, topology, group_size), _comm(comm_dtype)
    scale = logit_scale.exp().clamp(max=max_scale).reshape(())  # open_clip-style 0-d or FSDP-style [1]
    with _no_autocast(image_emb):
        if ring.world == 1 and image_emb.shape[0] <= direct_max_slots:
            text_emb = _rounded(text_emb, comm)
            return _direct_sigmoid_loss(image_emb, text_emb, valid, scale, logit_bias.reshape(()))
        counts = ring.valid_counts(valid)
        img, txt, valid = _valid_first(image_emb, text_emb, valid, counts[ring.rank])
        return _SigmoidRing.apply(
            img, txt, valid, scale, logit_bias.reshape(()), ring, tile_size, counts, comm
        )


class ContrastiveLoss(nn.Module):
    """Module form of `clip_loss` / `sigmoid_loss` (kind='softmax' or 'sigmoid').

    forward(image_emb [N_local, D], text_emb [N_local, D], valid [N_local], logit_scale, logit_bias=None)
    forward(image_emb, text_emb, valid, scale=s)   # open_clip's convention: ClipLoss(..., logit_scale.exp())

    `logit_scale` is the model's *log-space* parameter t (the multiplier is s = exp(t), clamped to
    max_scale), as navit-clip's and open_clip's models hold it; open_clip's `ClipLoss` instead takes
    s = t.exp(). Pass that as `scale=` (keyword only). On the first call, a `logit_scale` above
    log(max_scale) (an s passed where t belongs: it would be read as exp(s)) is a ValueError.
    """

    def __init__(
        self,
        kind: str = "softmax",
        group: dist.ProcessGroup | None = None,
        tile_size: int = 1024,
        max_scale: float = 100.0,
        direct_max_slots: int = 2048,
        topology: str = "ring",
        group_size: int = 0,
        comm_dtype: str = "float32",
    ):
        super().__init__()
        if kind not in ("softmax", "sigmoid"):
            raise ValueError(f"loss kind={kind!r} must be 'softmax' or 'sigmoid'")
        if tile_size < 1:
            raise ValueError(f"tile_size={tile_size} must be positive")
        if topology not in TOPOLOGIES:
            raise ValueError(f"loss topology={topology!r} is not one of {TOPOLOGIES}")
        _comm(comm_dtype)
        self.kind, self.group, self.tile_size = kind, group, tile_size
        self.max_scale, self.direct_max_slots = max_scale, direct_max_slots
        # ranks per node: given, else torchrun's (the ranks it started on this node)
        self.topology, self.comm_dtype = topology, comm_dtype
        self.group_size = group_size or int(os.environ.get("LOCAL_WORLD_SIZE", 0))
        self._checked = False

    def forward(
        self, image_emb, text_emb, valid, logit_scale=None, logit_bias=None, *, scale=None
    ) -> torch.Tensor:
        if (logit_scale is None) == (scale is None):
            raise ValueError(
                "give logit_scale (log space, the model's parameter) or scale= (exp of it), not both"
            )
        if scale is not None:
            logit_scale = torch.as_tensor(scale).log()
        elif not self._checked:
            bound = math.log(self.max_scale) + 1e-3
            if float(logit_scale.detach().max()) > bound:
                raise ValueError(
                    f"logit_scale={float(logit_scale.detach().max()):.4g} is above log(max_scale)={bound:.4g}: "
                    f"it looks like exp(t), open_clip's convention (ClipLoss(..., logit_scale.exp())). "
                    f"Pass the log-space parameter (model.logit_scale), or scale=logit_scale.exp()"
                )
            self._checked = True  # one host read per loss object, not one per step
        opts = dict(
            group=self.group,
            tile_size=self.tile_size,
            max_scale=self.max_scale,
            direct_max_slots=self.direct_max_slots,
            topology=self.topology,
            group_size=self.group_size,
            comm_dtype=self.comm_dtype,
        )
        if self.kind == "sigmoid":
            if logit_bias is None:
                raise ValueError("the sigmoid loss needs logit_bias (SigLIP initialises it to -10)")
            return sigmoid_loss(image_emb, text_emb, valid, logit_scale, logit_bias, **opts)
        return clip_loss(image_emb, text_emb, valid, logit_scale, **opts)


__all__ = ["ContrastiveLoss", "clip_loss", "sigmoid_loss"]
