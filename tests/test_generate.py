"""Generation: sampling (seeds, temperature, top-k, nucleus) and encoder-decoder decoding (greedy
and beam search, checked against exhaustive enumeration on tiny hand-built models)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.generate import beam_search, filter_logits, greedy_decode, sample

# ----------------------------------------------------------------------------- tiny models


def table_step(log_probs, carry, token):
    """A decoder whose next-token log-probs are a fixed row chosen by the previous token."""
    return carry, log_probs[token]


def table(rows) -> jax.Array:
    """Log-probs from rows of probabilities (each row normalised)."""
    p = np.asarray(rows, np.float64)
    return jnp.asarray(np.log(p / p.sum(axis=1, keepdims=True)), jnp.float32)


V, H, E = 7, 16, 8
CELL = rj.cells.gru(H)


def gru_params(seed=0):
    k_cell, k_emb, k_out = jax.random.split(jax.random.key(seed), 3)
    return {
        "cell": CELL.init(k_cell, E),
        "emb": jax.random.normal(k_emb, (V, E)),
        "out": 2.0 * jax.random.normal(k_out, (H, V)),  # peaked enough that beams differ
    }


def gru_step(params, h, token):
    h, y = CELL.step(params["cell"], h, params["emb"][token])
    return h, y @ params["out"]


def carries(n, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, H))


def enumerate_best(log_probs, start, end, max_len, length_penalty=0.0):
    """Every output of max_len tokens a decoder with end_token can give (after the first end
    only end follows): the best by score / length**length_penalty, and its summed log-prob."""
    lp = np.asarray(log_probs, np.float64)
    best = None
    for seq in itertools.product(range(lp.shape[0]), repeat=max_len):
        if end in seq and any(t != end for t in seq[seq.index(end) :]):
            continue  # not a possible output: something after the end
        n = seq.index(end) + 1 if end in seq else max_len
        score, prev = 0.0, start
        for t in seq[:n]:
            score, prev = score + lp[prev, t], t
        key = score / n**length_penalty
        if best is None or key > best[0]:
            best = (key, list(seq), score)
    return best[1], best[2]


# ----------------------------------------------------------------------------- greedy and beam


def test_greedy_equals_beam_search_of_width_one():
    params, start, end = gru_params(), 1, 0
    # jitted: one compile each, not one per operation of the decoding loops
    greedy = jax.jit(
        jax.vmap(lambda c: greedy_decode(gru_step, params, c, start, 9, end_token=end))
    )
    beam = jax.jit(jax.vmap(lambda c: beam_search(gru_step, params, c, start, end, 9, 1)))
    hs = carries(16)
    tokens, scores = beam(hs)
    np.testing.assert_array_equal(greedy(hs), tokens)
    # The score is the summed log-prob of the path, up to and including its first end.
    step = jax.jit(gru_step)
    for h, seq, score in zip(hs[:4], np.asarray(tokens), np.asarray(scores), strict=False):
        total, token = 0.0, start
        for t in seq:
            h, logits = step(params, h, token)
            total += float(jax.nn.log_softmax(logits)[t])
            if t == end:
                break
            token = t
        np.testing.assert_allclose(score, total, rtol=1e-5)
    assert len({tuple(s) for s in np.asarray(tokens).tolist()}) > 1  # the carries matter


def test_greedy_without_end_token_runs_on():
    # 0 -> 1 -> 2 -> 0 -> ...: a cycle through the "end" token 0.
    lp = table([[1, 8, 1], [1, 1, 8], [8, 1, 1]])
    assert greedy_decode(table_step, lp, None, 0, 5).tolist() == [1, 2, 0, 1, 2]
    assert greedy_decode(table_step, lp, None, 0, 5, end_token=0).tolist() == [1, 2, 0, 0, 0]


# Tokens: 0 start, 1 A, 2 B, 3 END. Greedy takes A (0.55) and then gets nothing good (at best
# 0.34 per step); B (0.45) is followed by a near-certain B, so the best sequence starts with B.
TRAP = table(
    [
        [0.00001, 0.55, 0.45, 0.00001],
        [0.00001, 0.34, 0.33, 0.33],
        [0.00001, 0.01, 0.97, 0.02],
        [0.00001, 0.33, 0.33, 0.34],
    ]
)


def test_beam_search_escapes_the_greedy_trap():
    greedy = greedy_decode(table_step, TRAP, None, 0, 3, end_token=3)
    tokens, score = beam_search(table_step, TRAP, None, 0, 3, 3, 2, length_penalty=0.0)
    assert greedy.tolist()[0] == 1 and tokens.tolist() == [2, 2, 2]
    path = [0, *greedy.tolist()]
    greedy_score = sum(float(TRAP[a, b]) for a, b in zip(path[:-1], path[1:], strict=True))
    np.testing.assert_allclose(score, np.log(0.45 * 0.97 * 0.97), rtol=1e-4)
    assert float(score) > greedy_score + 0.5
    best, best_score = enumerate_best(TRAP, 0, 3, 3)
    assert best == tokens.tolist()
    np.testing.assert_allclose(score, best_score, rtol=1e-5)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_a_wide_beam_finds_the_best_sequence_found_by_enumeration(seed, length_penalty):
    """With V**(max_len - 1) hypotheses nothing is pruned before the final pick, so beam search
    must agree with trying every sequence."""
    n, max_len, start, end = 4, 4, 0, 3
    rows = np.random.default_rng(seed).dirichlet(np.full(n, 0.5), n) + 1e-4
    lp = table(rows)
    best, best_score = enumerate_best(lp, start, end, max_len, length_penalty)
    search = jax.jit(
        functools.partial(beam_search, table_step, length_penalty=length_penalty),
        static_argnums=(4, 5),  # max_len, beam_size
    )
    tokens, score = search(lp, None, start, end, max_len, n ** (max_len - 1))
    assert tokens.tolist() == best
    np.testing.assert_allclose(score, best_score, rtol=1e-5)


def test_end_token_freezes_a_hypothesis_and_pads_the_output():
    # Tokens: 0 start, 1 A, 2 END. Ending at once has p 0.5; going on with A costs at least
    # another factor 0.6, so the hypothesis that ended first must stay in the beam and win.
    lp = table([[1e-4, 0.5, 0.5], [1e-4, 0.6, 0.4], [1e-4, 0.5, 0.5]])
    tokens, score = beam_search(table_step, lp, None, 0, 2, 5, 3, length_penalty=0.0)
    assert tokens.tolist() == [2, 2, 2, 2, 2]
    np.testing.assert_allclose(score, lp[0, 2], rtol=1e-6)  # frozen: nothing added after END
    # Every beam output has nothing but END after its first END.
    params = gru_params()
    tokens, _ = jax.vmap(lambda c: beam_search(gru_step, params, c, 1, 0, 12, 3))(carries(16))
    ended = 0
    for seq in tokens.tolist():
        if 0 in seq:
            ended += 1
            assert set(seq[seq.index(0) :]) == {0}
    assert ended > 0


def test_length_penalty_favours_the_better_mean():
    # Tokens: 0 start, 1 A, 2 END. [END]: log 0.4 = -0.92 in total and per token; [A, END]:
    # log 0.6 + log 0.6 = -1.02 in total but -0.51 per token.
    lp = table([[1e-6, 0.6, 0.4], [1e-6, 0.4, 0.6], [1e-6, 0.5, 0.5]])
    by_total, _ = beam_search(table_step, lp, None, 0, 2, 2, 2, length_penalty=0.0)
    by_mean, _ = beam_search(table_step, lp, None, 0, 2, 2, 2, length_penalty=1.0)
    assert by_total.tolist() == [2, 2] and by_mean.tolist() == [1, 2]


def test_decoding_errors():
    with pytest.raises(ValueError, match="max_len to be an int >= 1, got 0"):
        greedy_decode(table_step, TRAP, None, 0, 0)
    with pytest.raises(ValueError, match="beam_size to be an int >= 1, got 0"):
        beam_search(table_step, TRAP, None, 0, 3, 3, 0)
    with pytest.raises(ValueError, match=r"one example.*shape \(2,\); vmap over the batch"):
        beam_search(table_step, TRAP, None, jnp.zeros(2, int), 3, 3, 2)


# ----------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def lm():
    model = rj.layers.stack(rj.layers.rnn(rj.cells.gru(16)), rj.layers.dense(V))
    params = model.init(jax.random.key(0), V)
    params = jax.tree.map(lambda a: 3.0 * a, params)  # sharper predictions than at init

    def apply(p, tokens, carry):
        return model.apply(p, jax.nn.one_hot(tokens, V), carry=carry)

    return apply, params


PROMPT = jnp.array([1, 2, 3])


def test_sample_same_seed_same_text_other_seed_other_text(lm):
    apply, params = lm
    draw = lambda seed: sample(apply, params, PROMPT, 30, key=jax.random.key(seed)).tolist()  # noqa: E731
    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    assert len({tuple(draw(s)) for s in range(5)}) == 5


def argmax_rollout(apply, params, prompt, length):
    apply = jax.jit(apply)
    carry, logits = apply(params, prompt, None)
    out = []
    for _ in range(length):
        token = int(jnp.argmax(logits[-1]))
        out.append(token)
        carry, logits = apply(params, jnp.array([token]), carry)
    return out


def test_temperature_zero_is_the_argmax_rollout_and_top_k_one_too(lm):
    apply, params = lm
    expected = argmax_rollout(apply, params, PROMPT, 15)
    for seed in (0, 1):
        key = jax.random.key(seed)
        assert sample(apply, params, PROMPT, 15, key=key, temperature=0.0).tolist() == expected
        top1 = sample(apply, params, PROMPT, 15, key=key, temperature=1.5, top_k=1)
        assert top1.tolist() == expected
    assert len(set(expected)) > 1  # not a constant sequence


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    probs = jnp.array([0.15, 0.5, 0.05, 0.3])  # ranked: 1, 3, 0, 2
    logits = jnp.log(probs)
    kept = lambda out: set(np.flatnonzero(np.isfinite(np.asarray(out))).tolist())  # noqa: E731
    assert kept(filter_logits(logits, top_p=0.4)) == {1}  # the first always stays
    assert kept(filter_logits(logits, top_p=0.75)) == {1, 3}  # 0.5 < 0.75, 0.8 is not
    assert kept(filter_logits(logits, top_p=0.85)) == {1, 3, 0}
    assert kept(filter_logits(logits, top_p=1.0)) == {0, 1, 2, 3}
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == {1, 3}
    # Kept logits are the originals scaled by 1 / temperature; the renormalised nucleus keeps
    # the original ratios.
    out = filter_logits(logits, temperature=2.0, top_p=0.75)
    np.testing.assert_allclose(out[jnp.array([1, 3])], logits[jnp.array([1, 3])] / 2.0)
    renorm = jax.nn.softmax(filter_logits(logits, top_p=0.75))
    np.testing.assert_allclose(renorm[jnp.array([1, 3])], jnp.array([0.5, 0.3]) / 0.8, rtol=1e-6)
    # Batched: each row has its own nucleus.
    rows = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]]))
    assert np.isfinite(np.asarray(filter_logits(rows, top_p=0.6))).tolist() == [
        [True, False, False],
        [False, False, True],
    ]


def test_sample_frequencies_follow_the_filtered_distribution():
    """Many one-token draws from a fixed next-token table: tokens outside the nucleus never
    appear and the rest appear in the renormalised proportions."""
    lp = table([[0.15, 0.5, 0.05, 0.3]] * 4)

    def apply(p, tokens, carry):
        return carry, p[tokens]

    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.vmap(lambda k: sample(apply, lp, jnp.array([0]), 1, key=k, top_p=0.75)[0])
    counts = np.bincount(np.asarray(draw(keys)), minlength=4) / len(keys)
    assert counts[0] == counts[2] == 0
    np.testing.assert_allclose(counts[[1, 3]], [0.625, 0.375], atol=0.03)
    hot = jax.vmap(lambda k: sample(apply, lp, jnp.array([0]), 1, key=k, temperature=0.5)[0])
    counts = np.bincount(np.asarray(hot(keys)), minlength=4) / len(keys)
    sharp = np.array([0.15, 0.5, 0.05, 0.3]) ** 2
    np.testing.assert_allclose(counts, sharp / sharp.sum(), atol=0.03)
