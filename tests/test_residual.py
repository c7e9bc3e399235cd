import pytest
import torch
from torch import nn

from slmforge.config import ModelConfig
from slmforge.export.names import codemind_names
from slmforge.model.residual import block_sizes, make_residual

B, T, D, EPS = 2, 3, 8, 1e-6


def build(mode, n_layers=4, n_blocks=2, randomize=False):
    res = make_residual(ModelConfig(d_model=D, n_layers=n_layers, residual=mode, residual_blocks=n_blocks,
                                    norm_eps=EPS))
    res.reset_parameters()
    if randomize:
        with torch.no_grad():
            for p in res.parameters():
                p.copy_(torch.randn_like(p) if p.abs().sum() == 0 else 1 + 0.5 * torch.randn_like(p))
    return res


def drive(res, emb, sublayer, n_layers):
    """The Transformer's loop; sublayer(l, s, h) is the sublayer's output. -> (inputs at 2L points, output)."""
    state, inputs = res.begin(emb), []
    for layer in range(n_layers):
        for s in (0, 1):
            h = res.input(state, layer, s)
            inputs.append(h)
            res.add(state, layer, s, sublayer(layer, s, h))
    return inputs, res.output(state)


def constant_outputs(n_layers):
    outs = torch.randn(n_layers, 2, B, T, D)
    return outs, lambda layer, s, h: outs[layer, s]


def point_query(res, point, n_layers):
    """(query, key gain) of a Kimi-mode point: 2l + s, or 2L for the final one."""
    if point == 2 * n_layers:
        return res.final_query, res.final_key_gain
    layer, s = divmod(point, 2)
    return (res.attn_queries, res.ffn_queries)[s][layer], (res.attn_key_gains, res.ffn_key_gains)[s][layer]


def naive(sources, w, g=None):
    """softmax_i(w·g·RMSNorm(v_i)) weighted sum, one source at a time, in float64."""
    w = (w if g is None else w * g).double()
    logits = []
    for v in sources:
        v = v.double()
        logits.append((v / torch.sqrt((v * v).mean(-1, keepdim=True) + EPS) * w).sum(-1))
    alpha = torch.softmax(torch.stack(logits), 0)
    return sum(a[..., None] * v.double() for a, v in zip(alpha, sources))


def mean(*sources):
    return torch.stack(sources).mean(0)


def test_add_reproduces_plain_residual_exactly():
    L = 3
    res = build("add", L)
    assert list(res.parameters()) == []
    weights = torch.randn(L, 2, D, D) / D**0.5
    emb = torch.randn(B, T, D)
    _, out = drive(res, emb, lambda layer, s, h: torch.tanh(h @ weights[layer, s]), L)
    x = emb
    for layer in range(L):
        for s in (0, 1):
            x = x + torch.tanh(x @ weights[layer, s])
    assert torch.equal(out, x)


def test_zero_queries_average_the_full_sources():
    L = 3
    emb, (outs, f) = torch.randn(B, T, D), constant_outputs(L)
    inputs, out = drive(build("attnres_full", L), emb, f, L)
    flat = [emb] + [outs[layer, s] for layer in range(L) for s in (0, 1)]
    torch.testing.assert_close(inputs[0], emb, rtol=0, atol=0)
    torch.testing.assert_close(inputs[1], mean(emb, outs[0, 0]))
    torch.testing.assert_close(inputs[4], mean(emb, outs[0, 0], outs[0, 1], outs[1, 0], outs[1, 1]))
    for point in range(2 * L):
        torch.testing.assert_close(inputs[point], mean(*flat[:point + 1]))
    torch.testing.assert_close(out, mean(*flat))


def test_zero_queries_average_the_block_sources():
    emb, (o, f) = torch.randn(B, T, D), constant_outputs(4)
    inputs, out = drive(build("attnres_block", 4, 2), emb, f, 4)  # blocks: layers {0, 1}, {2, 3}
    b1 = o[0, 0] + o[0, 1] + o[1, 0] + o[1, 1]
    expected = [emb, mean(emb, o[0, 0]), mean(emb, o[0, 0] + o[0, 1]), mean(emb, o[0, 0] + o[0, 1] + o[1, 0]),
                mean(emb, b1), mean(emb, b1, o[2, 0]), mean(emb, b1, o[2, 0] + o[2, 1]),
                mean(emb, b1, o[2, 0] + o[2, 1] + o[3, 0])]
    for got, want in zip(inputs, expected, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out, mean(emb, b1, o[2, 0] + o[2, 1] + o[3, 0] + o[3, 1]))


def test_zero_queries_codemind_averages_and_keeps_inner_residuals():
    emb, (o, f) = torch.randn(B, T, D), constant_outputs(4)
    inputs, out = drive(build("attnres_codemind", 4, 2), emb, f, 4)
    h0 = emb
    y0 = h0 + o[0, 0] + o[0, 1]
    h1 = mean(emb, y0)
    y1 = h1 + o[1, 0] + o[1, 1]
    b1 = y0 + y1  # layer outputs, inputs included, summed per block
    h2 = mean(emb, b1)
    y2 = h2 + o[2, 0] + o[2, 1]
    h3 = mean(emb, b1, y2)
    y3 = h3 + o[3, 0] + o[3, 1]
    expected = [h0, h0 + o[0, 0], h1, h1 + o[1, 0], h2, h2 + o[2, 0], h3, h3 + o[3, 0]]
    for got, want in zip(inputs, expected, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out, y3)  # no final aggregation


def test_full_mode_matches_naive_softmax_with_random_queries():
    L = 3
    torch.manual_seed(0)
    res = build("attnres_full", L, randomize=True)
    emb, (outs, f) = torch.randn(B, T, D), constant_outputs(L)
    inputs, out = drive(res, emb, f, L)
    flat = [emb] + [outs[layer, s] for layer in range(L) for s in (0, 1)]
    with torch.no_grad():
        for point, got in enumerate(inputs + [out]):
            want = naive(flat[:point + 1], *point_query(res, point, L))
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
        assert (out - mean(*flat)).abs().max() > 1e-2  # the queries do matter


def _block_sources_check(res, n_layers, expected_sources):
    emb, (o, f) = torch.randn(B, T, D), constant_outputs(n_layers)
    inputs, out = drive(res, emb, f, n_layers)
    with torch.no_grad():
        for point, got in enumerate(inputs + [out]):
            want = naive(expected_sources(emb, o, point), *point_query(res, point, n_layers))
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)  # float32 block sums


def test_one_block_is_embedding_plus_running_sum():
    """N = 1: every point sees [embedding, sum of all earlier sublayer outputs] (the plain residual stream
    without the embedding), the first point the embedding alone."""
    L = 3

    def sources(emb, o, point):
        earlier = o.reshape(2 * L, B, T, D)[:point]
        return [emb] if point == 0 else [emb, earlier.sum(0)]

    _block_sources_check(build("attnres_block", L, 1, randomize=True), L, sources)


def test_one_block_per_layer_is_full_mode_over_layer_sums():
    """N = L: each layer's attention and FFN outputs form one source; before the FFN of layer l its
    attention output is the open partial sum."""
    L = 3

    def sources(emb, o, point):
        layer, s = divmod(point, 2)
        return [emb] + [o[j, 0] + o[j, 1] for j in range(layer)] + ([o[layer, 0]] if s else [])

    _block_sources_check(build("attnres_block", L, L, randomize=True), L, sources)


def test_uneven_blocks_are_as_even_as_possible():
    assert block_sizes(12, 8) == [2] * 4 + [1] * 4
    assert block_sizes(5, 2) == [3, 2] and block_sizes(6, 3) == [2, 2, 2]
    L = 5

    def sources(emb, o, point):  # blocks: layers {0, 1, 2}, {3, 4}
        flat = o.reshape(2 * L, B, T, D)
        if point <= 6:
            return [emb] + ([flat[:point].sum(0)] if point else [])
        return [emb, flat[:6].sum(0), flat[6:point].sum(0)]

    _block_sources_check(build("attnres_block", L, 2, randomize=True), L, sources)


def codemind_reference(emb, queries, block_size, attn, ffn):
    """CodeMind's `_forward_block_attnres` and `AttnResOperator`, restated."""
    block_reps, partial, last = [emb], None, None
    for i, q in enumerate(queries):
        sources = torch.stack(block_reps + ([partial] if partial is not None else []))
        keys = sources * torch.rsqrt(sources.pow(2).mean(-1, keepdim=True) + EPS)
        weights = torch.softmax(torch.einsum("d,nbsd->nbs", q, keys), dim=0)
        h = torch.einsum("nbs,nbsd->bsd", weights, sources)
        u = h + attn(i, h)
        last = u + ffn(i, u)
        partial = last if partial is None else partial + last
        if (i + 1) % block_size == 0 and i != len(queries) - 1:
            block_reps.append(partial)
            partial = None
    return last


@pytest.mark.parametrize("n_blocks", [1, 2, 4])
def test_codemind_matches_its_code_through_the_name_table(n_blocks):
    L = 4
    torch.manual_seed(n_blocks)
    theirs = {f"attn_res_operators.{i}.pseudo_query": torch.randn(D) for i in range(L)}
    model = nn.Module()
    model.residual = build("attnres_codemind", L, n_blocks)
    model.load_state_dict({codemind_names(L)[k]: v for k, v in theirs.items()})
    weights = torch.randn(L, 2, D, D) / D**0.5

    def sublayer(layer, s, h):
        return torch.tanh(h @ weights[layer, s])

    emb = torch.randn(B, T, D)
    _, out = drive(model.residual, emb, sublayer, L)
    want = codemind_reference(emb, list(theirs.values()), L // n_blocks, lambda i, h: sublayer(i, 0, h),
                              lambda i, u: sublayer(i, 1, u))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_codemind_needs_blocks_that_divide_the_layers():
    with pytest.raises(ValueError, match="divide"):
        build("attnres_codemind", 6, 4)


@pytest.mark.parametrize("mode", ["attnres_full", "attnres_block", "attnres_codemind"])
def test_gradients_reach_the_queries(mode):
    L = 3
    torch.manual_seed(1)
    res = build(mode, L, 1 if mode == "attnres_codemind" else 2)
    weights = torch.randn(L, 2, D, D) / D**0.5
    _, out = drive(res, torch.randn(B, T, D), lambda layer, s, h: torch.tanh(h @ weights[layer, s]), L)
    (out * torch.randn_like(out)).sum().backward()
    if mode == "attnres_codemind":
        norms = torch.stack([q.grad.norm() for q in res.queries])
    else:
        norms = torch.cat([res.attn_queries.grad.norm(dim=1), res.ffn_queries.grad.norm(dim=1),
                           res.final_query.grad.norm()[None]])
        assert res.attn_key_gains.grad.abs().max() == 0  # gains scale w, which is still zero
    assert norms[0] == 0  # the first point has a single source: softmax of one logit is constant
    assert (norms[1:] > 0).all()


def test_key_gains_get_gradients_once_queries_move():
    L = 2
    res = build("attnres_block", L, 2, randomize=True)
    weights = torch.randn(L, 2, D, D) / D**0.5
    _, out = drive(res, torch.randn(B, T, D), lambda layer, s, h: torch.tanh(h @ weights[layer, s]), L)
    out.square().sum().backward()
    assert res.attn_key_gains.grad[0].abs().max() == 0  # the single-source first point
    assert (res.attn_key_gains.grad[1:].norm(dim=1) > 0).all()
    assert (res.ffn_key_gains.grad.norm(dim=1) > 0).all() and res.final_key_gain.grad.norm() > 0


@pytest.mark.parametrize("mode", ["attnres_full", "attnres_block", "attnres_codemind"])
def test_aggregation_is_per_position(mode):
    """What one decoded token gets equals that position's row of a whole-sequence pass."""
    L = 4
    res = build(mode, L, 2, randomize=True)
    emb, (o, f) = torch.randn(B, T, D), constant_outputs(L)
    with torch.no_grad():
        inputs, out = drive(res, emb, f, L)
        last_inputs, last_out = drive(res, emb[:, -1:], lambda layer, s, h: o[layer, s][:, -1:], L)
    for whole, one in zip(inputs + [out], last_inputs + [last_out]):
        torch.testing.assert_close(whole[:, -1:], one, rtol=0, atol=1e-6)


def test_logits_stay_float32_under_autocast():
    L = 3
    res = build("attnres_full", L, randomize=True)
    emb, (_, f) = torch.randn(B, T, D), constant_outputs(L)
    with torch.no_grad():
        _, plain = drive(res, emb, f, L)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, cast = drive(res, emb, f, L)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_layers,d_model", [(4, 8), (12, 64)])
def test_parameter_counts(n_layers, d_model):
    def count(mode):
        cfg = ModelConfig(d_model=d_model, n_layers=n_layers, residual=mode, residual_blocks=2)
        return sum(p.numel() for p in make_residual(cfg).parameters())

    assert count("add") == 0
    assert count("attnres_full") == count("attnres_block") == 2 * (2 * n_layers + 1) * d_model
    assert count("attnres_codemind") == n_layers * d_model
