"""hess.attention: block selection (hand-computed answers) and every backend against ``reference``.

``reference`` is dense fp64 attention with the token-level mask implied by the selection; it is in
turn checked against dense SDPA (all budgets at max) and against a hand-built mask.
"""
from __future__ import annotations

import math
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import hess.attention.torch_backends as torch_backends
from hess.attention import (
    BACKENDS,
    BlockTokens,
    attend_with_specials,
    head_sparse_attention,
    make_layout,
    resolve_auto,
    select_blocks,
)
from hess.attention.flex_backend import build_block_mask, flex_patch_attention
from hess.attention.xformers_backend import (
    CHUNK_BYTES, iter_packed, pack_chunk, row_chunks, row_key_lengths, xformers_patch_attention,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# (B, H, S, P, n_s, D): N_p never a multiple of 64, several frame counts, > 64 special keys, n_s = 0.
SHAPES = [(2, 3, 3, 100, 5, 16), (2, 4, 5, 61, 3, 8), (1, 2, 1, 200, 5, 16), (2, 2, 4, 40, 0, 8), (1, 3, 20, 10, 4, 8)]
CDFS = [None, 0.5, "per-head"]


def make_qkv(B, H, S, P, D, *, seed=0, dtype=torch.float32):
    """Random q, k, v [B, H, S·P, D] with a smooth component, so pooled block scores are peaked."""
    g = torch.Generator().manual_seed(seed)
    N = S * P
    smooth = lambda: torch.randn(B, H, N // 16 + 1, D, generator=g).repeat_interleave(16, dim=2)[:, :, :N]  # noqa: E731
    q = torch.randn(B, H, N, D, generator=g) + 2 * smooth()
    k = torch.randn(B, H, N, D, generator=g) + 2 * smooth()
    v = torch.randn(B, H, N, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def tokens_of(q, k, v, kw):
    return BlockTokens(q, k, v, make_layout(q, k, v, kw["tokens_per_frame"], kw["num_special"], 128, 64))


def n_key_blocks(S, P, n_s, k_block=64):
    return math.ceil(S * (P - n_s) / k_block)


def case(shape, cdf, seed=0):
    B, H, S, P, n_s, D = shape
    q, k, v = make_qkv(B, H, S, P, D, seed=seed)
    n_k = n_key_blocks(S, P, n_s)
    g = torch.Generator().manual_seed(seed + 1)
    budgets = torch.randint(1, n_k + 1, (H,), generator=g)
    budgets[0] = 1  # always one head at the minimum (drops the partial block most of the time)
    tau = torch.linspace(0.3, 0.95, H) if cdf == "per-head" else cdf
    kw = dict(tokens_per_frame=P, num_special=n_s, blocks_per_head=budgets, cdf_threshold=tau)
    return q, k, v, kw


# ---------------------------------------------------------------- selection, hand-computed


def hand_case():
    """S=1, P=6, n_s=1, D=2 → N_p=5; q_block=3 (rows 3+2), k_block=2 (cols 2+2+1).

    Pooled k: [1,0], [0,1], [1,0] (block 2 is a single row: its mean is that row).
    Pooled q: row 0 [2,0] (ties blocks 0 and 2), row 1 [0,3] (partial: mean of its 2 rows).
    """
    special = torch.tensor([[9.0, 9.0]])
    qp = torch.tensor([[2.0, 0], [2, 0], [2, 0], [0, 3], [0, 3]])
    kp = torch.tensor([[1.0, 0], [1, 0], [0, 2], [0, 0], [1, 0]])
    q = torch.cat([special, qp])[None, None]
    k = torch.cat([special, kp])[None, None]
    return q, k


def test_selection_known_answer_with_ties_and_partial_blocks():
    q, k = hand_case()
    kw = dict(tokens_per_frame=6, num_special=1, q_block=3, k_block=2)
    sel = select_blocks(q, k, blocks_per_head=torch.tensor([1]), **kw)
    assert (sel.n_q, sel.n_k) == (2, 3)
    assert sel.block_mask[0, 0].tolist() == [[True, False, False], [False, True, False]]  # tie → block 0
    assert sel.kv_num_blocks[0, 0].tolist() == [1, 1]
    assert sel.kv_indices[0, 0].tolist() == [[0, 1, 2], [1, 0, 2]]
    # row 0 keeps 3 rows × 2 cols, row 1 keeps 2 rows × 2 cols, of a 5 × 5 patch matrix
    assert sel.density.tolist() == pytest.approx([10 / 25])
    assert sel.density_with_sinks == pytest.approx(2 / 6)  # ceil((5 + 1) / 2) − 3 = 0 sink columns
    two = select_blocks(q, k, blocks_per_head=torch.tensor([2]), **kw)
    assert two.block_mask[0, 0].tolist() == [[True, False, True], [True, True, False]]
    expected_scores = torch.softmax(torch.tensor([0.0, 3, 0]) / math.sqrt(2), 0)
    torch.testing.assert_close(sel.block_scores[0, 0, 1], expected_scores)


def test_cdf_floor_counts_like_sparsevggt():
    q, k = hand_case()
    kw = dict(tokens_per_frame=6, num_special=1, q_block=3, k_block=2, blocks_per_head=torch.tensor([1]))
    # row 1 sorted scores ≈ [0.806, 0.097, 0.097], cumsum [0.806, 0.903, 1.0]
    assert select_blocks(q, k, cdf_threshold=0.85, **kw).block_mask[0, 0, 1].tolist() == [False, True, False]
    assert select_blocks(q, k, cdf_threshold=0.95, **kw).block_mask[0, 0, 1].tolist() == [True, True, False]
    assert select_blocks(q, k, cdf_threshold=1.0, **kw).kv_num_blocks[0, 0].tolist() == [3, 3]
    assert select_blocks(q, k, cdf_threshold=0.0, **kw).kv_num_blocks[0, 0].tolist() == [1, 1]  # never below c_h


def test_density_is_budget_over_blocks_when_blocks_are_whole():
    q, k, v = make_qkv(2, 4, 2, 133, 8)  # 128 patch tokens per frame: N_p = 256, n_q = 2, n_k = 4
    sel = select_blocks(q, k, tokens_per_frame=133, num_special=5, blocks_per_head=torch.tensor([1, 2, 3, 4]))
    assert sel.density.tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert sel.density_overall == pytest.approx(0.625)
    assert sel.density_with_sinks == pytest.approx((10 / 4 + 1) / 5)  # ceil(266 / 64) − 4 = 1 sink column


def test_budgets_take_the_top_scoring_blocks():
    q, k, v, kw = case(SHAPES[0], None)
    sel = select_blocks(q, k, **kw)
    for b, h, r in [(0, 0, 0), (1, 2, 1), (0, 1, 2)]:
        kept = sel.block_scores[b, h, r][sel.block_mask[b, h, r]]
        dropped = sel.block_scores[b, h, r][~sel.block_mask[b, h, r]]
        assert len(kept) == int(kw["blocks_per_head"][h])
        assert dropped.numel() == 0 or kept.min() >= dropped.max()


# ---------------------------------------------------------------- backends vs reference


def test_reference_with_full_budgets_is_dense_sdpa():
    for shape in SHAPES[:3]:
        B, H, S, P, n_s, D = shape
        q, k, v = make_qkv(B, H, S, P, D)
        full = torch.full((H,), n_key_blocks(S, P, n_s))
        for backend in ("reference", "gather", "auto"):
            out = head_sparse_attention(q, k, v, tokens_per_frame=P, num_special=n_s, blocks_per_head=full, backend=backend)
            assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-5, backend


def test_reference_matches_a_hand_built_mask():
    B, H, S, P, n_s, D = 1, 2, 2, 70, 6, 8  # N_p = 128: key block j = the 64 patches of frame j
    q, k, v = make_qkv(B, H, S, P, D)
    out, sel = head_sparse_attention(q, k, v, tokens_per_frame=P, num_special=n_s, blocks_per_head=torch.tensor([1, 2]),
                                     backend="reference", return_selection=True)
    assert (sel.n_q, sel.n_k) == (1, 2)
    kept = sel.block_mask[0, 0, 0]  # head 0 keeps exactly one frame's patches (key block j = frame j)
    allowed = torch.ones(H, S * P, S * P, dtype=torch.bool)
    for f in range(S):
        if not kept[f]:
            patch_rows = torch.cat([torch.arange(fr * P + n_s, (fr + 1) * P) for fr in range(S)])
            allowed[0, patch_rows[:, None], torch.arange(f * P + n_s, (f + 1) * P)] = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None])
    assert (out - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("cdf", CDFS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gather_matches_reference(shape, cdf):
    q, k, v, kw = case(shape, cdf)
    ref = head_sparse_attention(q, k, v, backend="reference", **kw)
    with torch.no_grad():
        out = head_sparse_attention(q, k, v, backend="gather", **kw)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("chunk, workers", [(1, 1), (1, 3), (40_000, 2)])
def test_gather_chunking_and_ragged_rows(monkeypatch, chunk, workers):
    """One row per chunk, and chunks mixing rows of different lengths (masked); 1–3 CPU workers."""
    monkeypatch.setattr(torch_backends, "CHUNK_SCORES_CPU", chunk)
    monkeypatch.setattr(torch_backends, "CPU_WORKERS", workers)
    threads = torch.get_num_threads()
    q, k, v, kw = case((2, 3, 6, 90, 5, 16), "per-head", seed=3)
    ref = head_sparse_attention(q, k, v, backend="reference", **kw)
    with torch.no_grad():
        fast = head_sparse_attention(q, k, v, backend="gather", **kw)
    assert (fast - ref).abs().max() <= 1e-5
    assert torch.get_num_threads() == threads  # the workers' single-thread setting is undone


def test_gather_under_inference_mode_with_workers(monkeypatch):
    monkeypatch.setattr(torch_backends, "CPU_WORKERS", 2)
    monkeypatch.setattr(torch_backends, "CHUNK_SCORES_CPU", 1)
    q, k, v, kw = case(SHAPES[0], None)
    ref = head_sparse_attention(q, k, v, backend="reference", **kw)
    for _ in range(2):  # the second call reuses workspace buffers made in inference mode
        with torch.inference_mode():
            out = head_sparse_attention(q, k, v, backend="gather", **kw)
        assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("cdf", [None, "per-head"])
def test_gather_gradients_match_reference(cdf):
    q, k, v, kw = case((2, 3, 3, 100, 5, 16), cdf, seed=5)
    grad_out = torch.randn(q.shape)
    grads = {}
    for backend in ("reference", "gather"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = head_sparse_attention(*leaves, backend=backend, **kw)
        (out * grad_out).sum().backward()
        grads[backend] = (out.detach(), [t.grad for t in leaves])
    assert (grads["gather"][0] - grads["reference"][0]).abs().max() <= 1e-5
    for name, a, b in zip("qkv", grads["gather"][1], grads["reference"][1]):
        assert (a - b).abs().max() <= 1e-5, name


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("cdf", [None, "per-head"])
@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:])
def test_flex_block_mask_and_eager_flex_match_reference(shape, cdf):
    """Quick flex check without compiling: the BlockMask's block lists are the selection (+ sinks),
    and eager flex (which applies only mask_mod) equals the reference."""
    q, k, v, kw = case(shape, cdf)
    ref, sel = head_sparse_attention(q, k, v, backend="reference", return_selection=True, **kw)
    lay = sel.layout
    dense = build_block_mask(sel).to_dense().bool()  # [B, H, n_q, n_sink + n_k], partial ∪ full blocks
    n_sink = math.ceil(lay.num_special_total / lay.k_block)
    assert lay.n_sink == n_sink and dense.shape[-1] == n_sink + lay.n_k
    assert torch.equal(dense[..., n_sink:], sel.block_mask) and bool(dense[..., :n_sink].all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = attend_with_specials(tokens_of(q, k, v, kw), sel, partial(flex_patch_attention, compiled=False))
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("cdf", [None, "per-head"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]])
def test_compiled_flex_matches_reference(shape, cdf):
    """Compiled FlexAttention (Inductor C++ on CPU): 10–60 s of compilation per new shape."""
    q, k, v, kw = case(shape, cdf)
    ref = head_sparse_attention(q, k, v, backend="reference", **kw)
    with torch.no_grad():
        out = head_sparse_attention(q, k, v, backend="flex", **kw)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_bytes", [None, 1, 20_000])
def test_xformers_packing_matches_reference(shape, chunk_bytes):
    """The chunked packing xformers receives, run through the CPU kernel (SDPA, block-diagonal mask):
    one chunk, one row per chunk, and a few rows per chunk give the reference output."""
    q, k, v, kw = case(shape, "per-head")
    ref, sel = head_sparse_attention(q, k, v, backend="reference", return_selection=True, **kw)
    fn = partial(xformers_patch_attention, kernel="torch", chunk_bytes=chunk_bytes)
    out = attend_with_specials(tokens_of(q, k, v, kw), sel, fn)
    assert (out - ref).abs().max() <= 1e-5


def test_xformers_packing_by_hand():
    """S=1, P=6, n_s=1 (N_p=5), q_block=3, k_block=2: table = [pad, special | p0 p1 | p2 p3 | p4 pad]."""
    q, k = hand_case()
    kw = dict(tokens_per_frame=6, num_special=1, q_block=3, k_block=2)
    sel = select_blocks(q, k, blocks_per_head=torch.tensor([2]), **kw)
    # rows keep blocks {0, 2} and {0, 1} (test above): keys = special, then the valid rows of those blocks
    chunk = pack_chunk(sel, 0, 2)
    assert chunk.kv_lens == [1 + 2 + 1, 1 + 2 + 2]
    assert chunk.key_index.tolist() == [1, 2, 3, 6, 1, 2, 3, 4, 5]
    assert row_key_lengths(sel).tolist() == [4, 5]
    assert [(c.start, c.end) for c in iter_packed(sel, 2, 4, chunk_bytes=5 * (2 * 2 * 4 + 8))] == [(0, 1), (1, 2)]


def test_xformers_chunks_bound_the_packed_keys():
    """Chunks are consecutive, cover every row once, and stay within the key budget (one row may exceed it)."""
    lengths = torch.tensor([5, 3, 9, 2, 2, 20, 1])
    chunks = row_chunks(lengths, 10)
    assert chunks == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7)]
    q, k, v, kw = case(SHAPES[4], None)  # S = 20 frames: many rows
    sel = select_blocks(q, k, **kw)
    per_key = 2 * q.shape[-1] * q.element_size() + 8
    budget = per_key * 150
    packed = list(iter_packed(sel, q.shape[-1], q.element_size(), budget))
    assert len(packed) > 1 and packed[0].start == 0 and packed[-1].end == sel.block_mask.numel() // sel.n_k
    assert all(a.end == b.start for a, b in zip(packed, packed[1:]))
    assert all(c.key_index.numel() * per_key <= budget or c.end - c.start == 1 for c in packed)
    assert CHUNK_BYTES >= 1 << 20


def test_xformers_block_diagonal_mask_semantics_on_cpu():
    """xformers' own BlockDiagonalMask (plain Python on CPU), materialised, gives the reference output."""
    fmha = pytest.importorskip("xformers.ops.fmha", reason="xformers not installed")
    q, k, v, kw = case(SHAPES[1], "per-head")
    ref, sel = head_sparse_attention(q, k, v, backend="reference", return_selection=True, **kw)

    def kernel(qq, kk, vv, q_lens, kv_lens, scale):
        bias = fmha.BlockDiagonalMask.from_seqlens(q_seqlen=q_lens, kv_seqlen=kv_lens)
        mask = bias.materialize((qq.shape[0], kk.shape[0]), dtype=qq.dtype)
        return F.scaled_dot_product_attention(qq[None], kk[None], vv[None], attn_mask=mask, scale=scale)[0]

    import hess.attention.xformers_backend as xb
    xb.KERNELS.register("test-materialised")(kernel)
    try:
        fn = partial(xformers_patch_attention, kernel="test-materialised", chunk_bytes=20_000)
        out = attend_with_specials(tokens_of(q, k, v, kw), sel, fn)
    finally:
        xb.KERNELS._items.pop("test-materialised", None)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only backends")
@pytest.mark.parametrize("backend", ["xformers", "flex", "gather"])
def test_cuda_backends_match_reference(backend):
    q, k, v, kw = case(SHAPES[0], "per-head")
    ref = head_sparse_attention(q, k, v, backend="reference", **kw)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    kw["blocks_per_head"] = kw["blocks_per_head"].cuda()
    with torch.no_grad():
        out = head_sparse_attention(q, k, v, backend=backend, **kw)
    assert (out.cpu() - ref).abs().max() <= 1e-5


# ---------------------------------------------------------------- dispatch and errors


def test_auto_picks_gather_on_cpu_and_for_gradients():
    q, k, v, kw = case(SHAPES[0], None)
    assert resolve_auto(q, k, v) == "gather"
    assert resolve_auto(q.requires_grad_(True), k, v) == "gather"
    assert set(BACKENDS) == {"auto", "reference", "gather", "flex", "xformers"}


def test_cpu_only_limits_raise_clear_errors():
    q, k, v, kw = case(SHAPES[0], None)
    with pytest.raises(RuntimeError, match="CUDA"):
        head_sparse_attention(q, k, v, backend="xformers", **kw)
    with pytest.raises(NotImplementedError, match="gather"):
        head_sparse_attention(q.requires_grad_(True), k, v, backend="flex", **kw)


def test_bad_inputs_raise_clear_errors():
    q, k, v, kw = case(SHAPES[0], None)  # H = 3, n_k = 5, P = 100
    call = lambda **over: head_sparse_attention(q, k, v, **{**kw, **over})  # noqa: E731
    with pytest.raises(ValueError, match=r"\[1, n_k=5\]"):
        call(blocks_per_head=torch.tensor([1, 6, 2]))
    with pytest.raises(ValueError, match=r"\[1, n_k=5\]"):
        call(blocks_per_head=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        call(blocks_per_head=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer dtype"):
        call(blocks_per_head=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="integer tensor"):
        call(blocks_per_head=[1, 2, 3])
    with pytest.raises(ValueError, match="does not divide"):
        call(tokens_per_frame=77)
    with pytest.raises(ValueError, match="num_special"):
        call(num_special=100)
    with pytest.raises(ValueError, match="cdf_threshold"):
        call(cdf_threshold=1.5)
    with pytest.raises(KeyError, match="known: auto, flex, gather, reference, xformers"):
        call(backend="sparge")
    with pytest.raises(ValueError, match="shapes must match"):
        head_sparse_attention(q, k[:, :, :-100], v, **kw)
    with pytest.raises(ValueError, match="shapes must match"):
        head_sparse_attention(q, k, v[..., :8], **kw)
    with pytest.raises(TypeError, match="dtype"):
        head_sparse_attention(q, k.double(), v, **kw)
    bad = q.clone()
    bad[0, 0, 7, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        head_sparse_attention(bad, k, v, **kw)
