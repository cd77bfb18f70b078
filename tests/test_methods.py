"""Closed-form checks of the low-rank methods and the interpolative decomposition."""

from __future__ import annotations

import pytest
import torch

from compression.errors import UserInputError
from compression.methods import (
    METHODS,
    LowRankDecomposition,
    LayerStats,
    NeuronDecomposition,
    decompose,
    pivoted_cholesky,
    select_neurons,
    Whitening,
)

F64 = torch.float64
SVD_FAMILY = ("svd", "fwsvd", "whiten", "whiten-fw", "whiten-fd")


def make_layer(m: int, n: int, tokens: int, dead: int = 0, seed: int = 0):
    """W [m, n], anisotropic inputs X [n, tokens] (first `dead` inputs always 0), stats."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen, dtype=F64)
    scales = torch.logspace(0, -2, n, dtype=F64)
    x = scales[:, None] * torch.randn(n, tokens, generator=gen, dtype=F64)
    x[:dead] = 0.0
    x[dead:] += 0.3 * torch.randn(1, tokens, generator=gen, dtype=F64)  # correlated inputs
    dy = torch.randn(m, tokens, generator=gen, dtype=F64) * torch.logspace(0, -1.5, m, dtype=F64)[:, None]
    stats = LayerStats(
        gram=x @ x.T,
        tokens=tokens,
        row_fisher=(dy @ x.T).square().sum(1),
        col_fisher=(dy @ x.T).square().sum(0),
        neuron_fisher=dy.square().mean(1),
    )
    return w, x, stats


CASES = {
    "full": (16, 24, 200, 0),
    "few-tokens": (20, 40, 15, 0),
    "dead-inputs": (20, 40, 15, 3),
    "tall-deficient": (48, 32, 12, 2),
}


def dec(method: str, w, stats, **kw) -> LowRankDecomposition:
    return decompose(method, w, stats, store_dtype=F64, **kw)


def out_err(w, a, b, x) -> float:
    return float(((w - a @ b) @ x).square().sum())


@pytest.mark.parametrize("case", CASES)
def test_whiten_loss_equals_dropped_sigma_squared(case):
    m, n, t, dead = CASES[case]
    w, x, stats = make_layer(m, n, t, dead)
    d = dec("whiten", w, stats)
    curve = d.loss_curve()
    assert curve.shape == (d.max_rank + 1,) and curve.dtype == F64
    rank = min(m, t, n - dead)  # rank of W X
    for k in (1, 3, rank // 2, rank - 2):
        a, b = d.truncate(k, F64)
        assert a.shape == (m, k) and b.shape == (k, n)
        assert out_err(w, a, b, x) == pytest.approx(float(curve[k]), rel=1e-6)
        assert float(curve[k]) == pytest.approx(float(d.sigma[k:].square().sum()), rel=1e-12)
    # from the rank of W X on, the calibration error is zero (the clamp floor only orders the rest)
    a, b = d.truncate(rank, F64)
    assert out_err(w, a, b, x) < 1e-8 * float(curve[0])
    assert float(curve[rank]) < 1e-8 * float(curve[0])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", SVD_FAMILY)
def test_full_rank_reproduces_weight(case, method):
    m, n, t, dead = CASES[case]
    w, _, stats = make_layer(m, n, t, dead)
    d = dec(method, w, stats)
    assert d.max_rank == min(m, n)
    a, b = d.truncate(d.max_rank, F64)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a @ b - w).abs().max() <= 1e-8 * w.abs().max()
    assert float(d.loss_curve()[-1]) == 0.0


@pytest.mark.parametrize("case", ["full", "few-tokens"])
def test_whiten_beats_svd_and_fwsvd_on_calibration_data(case):
    m, n, t, dead = CASES[case]
    w, x, stats = make_layer(m, n, t, dead)
    for k in (2, 5, 10):
        errs = {meth: out_err(w, *dec(meth, w, stats).truncate(k, F64), x) for meth in ("svd", "fwsvd", "whiten")}
        assert errs["whiten"] < errs["svd"] and errs["whiten"] < errs["fwsvd"], errs


def test_svd_closed_form():
    w, _, _ = make_layer(12, 20, 30)
    d = dec("svd", w, None)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(d.sigma, s)
    for k in (1, 4, 11):
        a, b = d.truncate(k, F64)
        assert float((w - a @ b).square().sum()) == pytest.approx(float(s[k:].square().sum()), rel=1e-9)
        # balanced factors A = U_k S_k^1/2, B = S_k^1/2 V_k^T (up to the sign of each pair)
        torch.testing.assert_close(a.abs(), (u[:, :k] * s[:k].sqrt()).abs())
        torch.testing.assert_close(b.abs(), (s[:k].sqrt()[:, None] * vh[:k]).abs())


def test_fwsvd_minimises_fisher_weighted_error():
    w, _, stats = make_layer(16, 24, 200)
    d = dec("fwsvd", w, stats)
    col = stats.col_fisher
    scale = (col / col.mean()).sqrt()
    for k in (2, 7):
        a, b = d.truncate(k, F64)
        err = float(((w - a @ b) * scale).square().sum())
        assert err == pytest.approx(float(d.loss_curve()[k]), rel=1e-9)
        # the unweighted SVD is worse in this metric
        a2, b2 = dec("svd", w, None).truncate(k, F64)
        assert err < float(((w - a2 @ b2) * scale).square().sum())


def test_whiten_fw_loss_is_row_weighted_output_error():
    w, x, stats = make_layer(16, 24, 200)
    d = dec("whiten-fw", w, stats)
    rows = (stats.row_fisher / stats.row_fisher.mean()).sqrt()
    for k in (2, 7):
        a, b = d.truncate(k, F64)
        err = float((rows[:, None] * (w - a @ b) @ x).square().sum())
        assert err == pytest.approx(float(d.loss_curve()[k]), rel=1e-6)


def test_whiten_fd_alpha_zero_is_whiten_exactly():
    w, _, stats = make_layer(20, 40, 15, dead=3)
    d0 = dec("whiten-fd", w, stats, alpha=0.0)
    dw = dec("whiten", w, stats)
    assert torch.equal(d0.loss_curve(), dw.loss_curve())
    for k in (1, 6, 20):
        for f0, fw in zip(d0.truncate(k, F64), dw.truncate(k, F64)):
            assert torch.equal(f0, fw)


@pytest.mark.parametrize("case", ["full", "few-tokens"])
def test_whiten_fd_loss_is_fisher_estimate_in_unnormalised_units(case):
    m, n, t, dead = CASES[case]
    w, x, stats = make_layer(m, n, t, dead)
    g = stats.neuron_fisher
    d = dec("whiten-fd", w, stats)
    assert d.loss_scale == pytest.approx(float(g.mean()), rel=1e-12)
    s = Whitening(stats.gram).factor()
    rank = min(m, t, n - dead)
    for k in (1, 4, rank - 3):
        a, b = d.truncate(k, F64)
        e = w - a @ b
        # ||D_unnorm (W - W') S||^2 with D_unnorm = diag(sqrt(g)), S S^T = G + delta I
        assert float((g.sqrt()[:, None] * e @ s).square().sum()) == pytest.approx(float(d.loss_curve()[k]), rel=1e-9)
        # = sum over tokens of sum_i g_i e_ti^2 on the calibration data
        fisher = float((g[:, None] * (e @ x).square()).sum())
        assert fisher == pytest.approx(float(d.loss_curve()[k]), rel=1e-6)
        # and it is the minimiser of that estimate: whiten does worse
        aw, bw = dec("whiten", w, stats).truncate(k, F64)
        assert fisher <= float((g[:, None] * ((w - aw @ bw) @ x).square()).sum())


def test_rank_deficient_and_degenerate_statistics_stay_finite():
    w, _, stats = make_layer(20, 40, 5, dead=10)
    stats.row_fisher[:4] = 0.0
    stats.neuron_fisher[:4] = 0.0
    stats.col_fisher[:10] = 0.0
    zero = LayerStats(
        gram=torch.zeros(40, 40, dtype=F64),
        row_fisher=torch.zeros(20, dtype=F64),
        col_fisher=torch.zeros(40, dtype=F64),
        neuron_fisher=torch.zeros(20, dtype=F64),
    )
    for st in (stats, zero):
        for method in SVD_FAMILY:
            d = dec(method, w, st)
            assert torch.isfinite(d.sigma).all() and torch.isfinite(d.loss_curve()).all()
            for k in (1, 5, 20):
                a, b = d.truncate(k, F64)
                assert torch.isfinite(a).all() and torch.isfinite(b).all()
            a, b = d.truncate(20, F64)
            assert (a @ b - w).abs().max() <= 1e-8 * w.abs().max()
    # all-zero G: whitening falls back to plain SVD
    torch.testing.assert_close(dec("whiten", w, zero).sigma, dec("svd", w, None).sigma)


def test_default_storage_is_float32_and_truncate_is_cheap_view():
    w, x, stats = make_layer(16, 24, 200)
    d32 = decompose("whiten", w.float(), stats)
    d64 = dec("whiten", w, stats)
    a, b = d32.truncate(8)
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    a64, b64 = d64.truncate(8, F64)
    assert ((a.double() @ b.double()) - a64 @ b64).abs().max() < 1e-4 * w.abs().max()
    assert d32.nbytes() < d64.nbytes()
    assert d32.cost_per_rank == 40


def test_bad_inputs():
    w, _, stats = make_layer(8, 12, 30)
    with pytest.raises(UserInputError, match="svd, fwsvd, whiten, whiten-fw, whiten-fd, id"):
        decompose("asvd", w, stats)
    with pytest.raises(UserInputError, match="gram"):
        decompose("whiten", w, LayerStats())
    with pytest.raises(UserInputError, match="neuron_fisher"):
        decompose("whiten-fd", w, LayerStats(gram=stats.gram))
    with pytest.raises(UserInputError, match="shape"):
        decompose("whiten", w, LayerStats(gram=torch.eye(5, dtype=F64)))
    with pytest.raises(UserInputError, match="NaN"):
        decompose("whiten", w, LayerStats(gram=stats.gram * float("nan")))
    with pytest.raises(UserInputError, match="alpha"):
        decompose("whiten-fd", w, stats, alpha=-1.0)
    with pytest.raises(UserInputError, match="Gram"):
        decompose("id", w, None)
    d = decompose("svd", w)
    for k in (-1, 9, 2.0):
        with pytest.raises(UserInputError, match="rank"):
            d.truncate(k)
    assert d.truncate(0)[0].shape == (8, 0)
    assert d.truncate(torch.tensor(3))[1].shape == (3, 12)
    assert METHODS == ("svd", "fwsvd", "whiten", "whiten-fw", "whiten-fd", "id", "id-fd", "hybrid")


# ---------------------------------------------------------------- id


def make_mlp(h: int, f: int, tokens: int, dead: int = 0, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    hid = torch.relu(torch.randn(f, tokens, generator=gen, dtype=F64) + 0.2)
    hid *= torch.logspace(0, -1, f, dtype=F64)[torch.randperm(f, generator=gen)][:, None]
    hid[f - dead :] = 0.0
    wd = torch.randn(h, f, generator=gen, dtype=F64)
    return wd, hid


def test_id_full_width_reproduces_mlp_exactly():
    for tokens, dead in ((300, 0), (20, 5)):
        wd, hid = make_mlp(10, 32, tokens, dead)
        nd = select_neurons(hid @ hid.T, wd, store_dtype=F64)
        kept, down = nd.select(32, F64)
        assert torch.equal(kept, torch.arange(32))
        assert torch.equal(down, wd)
        assert float(nd.loss_curve()[32]) == 0.0


def test_id_pivots_match_scipy_column_pivoted_qr():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    _, hid = make_mlp(10, 30, 400)
    # near-duplicate neurons: large norms but little new information once a twin is chosen
    gen = torch.Generator().manual_seed(5)
    hid[10:20] = 1.5 * hid[:10] + 0.05 * torch.randn(10, 400, generator=gen, dtype=F64)
    _, _, piv = scipy_linalg.qr(hid.T.numpy(), mode="economic", pivoting=True)
    order, factor, _ = pivoted_cholesky(hid @ hid.T)
    assert order.tolist() == piv.tolist()
    assert order.tolist() != torch.argsort(hid.square().sum(1), descending=True).tolist()
    torch.testing.assert_close(factor @ factor.T, hid @ hid.T)


def test_id_interpolation_is_least_squares_and_loss_curve_exact():
    wd, hid = make_mlp(10, 30, 400)
    g = hid @ hid.T
    nd = select_neurons(g, wd, store_dtype=F64)
    errors = []
    for k in range(1, 31):
        kept, down = nd.select(k, F64)
        assert torch.equal(kept, kept.sort().values) and down.shape == (10, k)
        err = float((wd @ hid - down @ hid[kept]).square().sum())
        errors.append(err)
        if k < 30:
            assert err == pytest.approx(float(nd.loss_curve()[k]), rel=1e-6)
            # closed form: W_d C with C = G[:, J] G[J, J]^-1
            c = g[:, kept] @ torch.linalg.inv(g[kept][:, kept])
            torch.testing.assert_close(down, wd @ c, rtol=1e-7, atol=1e-9)
            schur = g - g[:, kept] @ torch.linalg.solve(g[kept][:, kept], g[kept])
            assert float(torch.trace(wd @ schur @ wd.T)) == pytest.approx(err, rel=1e-6)
    assert all(a >= b - 1e-9 * errors[0] for a, b in zip(errors, errors[1:]))
    assert errors[0] > 10 * errors[20] > 0


def test_id_rank_deficient_finite_and_dead_neurons_last():
    wd, hid = make_mlp(12, 48, 16, dead=6)
    nd = decompose("id", wd, LayerStats(gram=hid @ hid.T), store_dtype=F64)
    assert isinstance(nd, NeuronDecomposition)
    assert nd.rank <= 16
    assert set(nd.order[-6:].tolist()) == set(range(42, 48))
    curve = nd.loss_curve()
    assert torch.isfinite(curve).all() and curve[0] > 0
    for k in (1, 8, 16, 30, 42):
        kept, down = nd.select(k, F64)
        assert torch.isfinite(down).all()
        err = float((wd @ hid - down @ hid[kept]).square().sum())
        assert err == pytest.approx(float(curve[k]), rel=1e-6, abs=1e-9 * float(curve[0]))
    # 16 tokens span at most 16 dimensions: 16 neurons reconstruct the calibration activations
    assert float(curve[nd.rank]) < 1e-8 * float(curve[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_results_stay_on_the_weight_device():
    w, _, stats = make_layer(16, 24, 200)
    cuda = LayerStats(**{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(stats).items()})
    for method in SVD_FAMILY:
        d = decompose(method, w.cuda().float(), cuda)
        a, b = d.truncate(5)
        assert a.is_cuda and b.is_cuda and d.loss_curve().is_cuda
        a_cpu, b_cpu = decompose(method, w.float(), stats).truncate(5)
        torch.testing.assert_close((a @ b).cpu(), a_cpu @ b_cpu, rtol=1e-4, atol=1e-4)
    wd, hid = make_mlp(10, 32, 300)
    kept, down = select_neurons((hid @ hid.T).cuda(), wd.cuda()).select(16)
    assert kept.is_cuda and down.is_cuda
    kept_cpu, down_cpu = select_neurons(hid @ hid.T, wd).select(16)
    assert torch.equal(kept.cpu(), kept_cpu)


@pytest.mark.parametrize("block", [128, 5], ids=["one-block", "blocks"])
@pytest.mark.parametrize("shape", [(12, 30), (30, 12), (20, 20)], ids=["wide", "tall", "square"])
@pytest.mark.parametrize("right", ["none", "diagonal", "whitening"])
def test_the_smaller_side_gives_the_svd_of_m(shape, right, block, monkeypatch):
    """U and Sigma from M M^T (wide) or from M^T M (tall) are those of a direct SVD of M = L W R,
    and the rank-k product is the SVD's truncation pulled back through L; also when the
    triangular products run in several blocks."""
    from compression.methods import factors
    from compression.methods.factors import weighted_svd

    monkeypatch.setattr(factors, "_BLOCK", block)
    m, n = shape
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(m, n, generator=gen, dtype=F64)
    row = torch.rand(m, generator=gen, dtype=F64) + 0.5
    x = torch.randn(n, 3 * n, generator=gen, dtype=F64) * torch.logspace(0, -1, n, dtype=F64)[:, None]
    r = {"none": None, "diagonal": torch.rand(n, generator=gen, dtype=F64) + 0.5,
         "whitening": Whitening(x @ x.T)}[right]
    dense_r = {"none": torch.eye(n, dtype=F64), "diagonal": torch.diag(r) if right == "diagonal" else None,
               "whitening": r.factor() if right == "whitening" else None}[right]
    d = weighted_svd(w, row, r, store_dtype=F64)
    mat = (row[:, None] * w) @ dense_r
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    torch.testing.assert_close(d.sigma, s, rtol=1e-9, atol=1e-12 * float(s[0]))
    for k in (1, min(m, n) // 2, min(m, n)):
        a, b = d.truncate(k, F64)
        best = (u[:, :k] * s[:k]) @ vh[:k]  # Eckart-Young in the weighted space
        torch.testing.assert_close((row[:, None] * (a @ b)) @ dense_r, best, rtol=1e-8, atol=1e-9 * float(s[0]))


def test_the_triangular_products_are_the_full_products():
    from compression.methods.factors import _lower_product, _times_lower

    gen = torch.Generator().manual_seed(3)
    for m, n in ((300, 200), (128, 64), (7, 300)):
        a, b = torch.randn(m, n, generator=gen, dtype=F64), torch.randn(m, n, generator=gen, dtype=F64)
        lower = _lower_product(a, b)
        full = a @ b.T
        torch.testing.assert_close(torch.tril(lower), torch.tril(full), rtol=1e-13, atol=1e-12)
        tri = torch.tril(torch.randn(n, n, generator=gen, dtype=F64))
        torch.testing.assert_close(_times_lower(a, tri), a @ tri, rtol=1e-13, atol=1e-12)


def test_the_orthonormal_factor_of_m_v_spans_its_columns_in_order():
    """Normalised columns where sigma is large, a QR completion where it is small or zero: U is
    orthonormal and its first j columns span the first j columns of M V, for every j."""
    from compression.methods.factors import _orthonormal

    gen = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(60, 20, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=F64))
    sigma = torch.cat([torch.logspace(0, -2.5, 12, dtype=F64), torch.logspace(-4, -12, 5, dtype=F64),
                       torch.zeros(3, dtype=F64)])  # large, small, zero
    mv = (q * sigma) @ v.T @ v  # M V = U Sigma, with round-off
    u = _orthonormal(mv)
    torch.testing.assert_close(u.T @ u, torch.eye(20, dtype=F64), rtol=0, atol=1e-12)
    for j in range(1, 21):
        part = mv[:, :j]
        torch.testing.assert_close(u[:, :j] @ (u[:, :j].T @ part), part, rtol=0, atol=1e-13)
    torch.testing.assert_close(u[:, :12].abs(), q[:, :12].abs(), rtol=0, atol=1e-12)  # the normalised columns
    zero = _orthonormal(torch.zeros(6, 3, dtype=F64))
    torch.testing.assert_close(zero.T @ zero, torch.eye(3, dtype=F64))


def test_whitening_is_the_regularised_gram_and_never_fails():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 6, generator=gen, dtype=F64)
    x[:10] = 0.0  # dead inputs and fewer tokens than inputs: G has rank 6 of 40
    gram = x @ x.T
    wh = Whitening(gram, clamp=1e-12)
    assert wh.delta == pytest.approx(1e-12 * float(gram.trace()))
    torch.testing.assert_close(wh.gram, gram + wh.delta * torch.eye(40, dtype=F64), rtol=1e-15, atol=1e-15)  # symmetrised
    s = wh.factor()
    assert torch.isfinite(s).all() and torch.equal(s, torch.tril(s))
    torch.testing.assert_close(s @ s.T, wh.gram, rtol=1e-10, atol=1e-10 * float(gram.diagonal().max()))
    assert wh.factor() is s  # made once
    zero = Whitening(torch.zeros(5, 5, dtype=F64))
    assert torch.equal(zero.gram, torch.eye(5, dtype=F64)) and torch.equal(zero.factor(), torch.eye(5, dtype=F64))
