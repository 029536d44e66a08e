"""Bad input fails in Python, at trace time, with a message naming expected, got and the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import H, I, T

import rnnjax as rj

KEY = jax.random.key(0)
LSTM = rj.cells.lstm(H)
PARAMS = LSTM.init(KEY, I)
XS = jnp.ones((T, I))


@pytest.mark.parametrize("run", [rj.scan, rj.loop], ids=["scan", "loop"])
def test_batched_input_says_vmap(run):
    with pytest.raises(
        ValueError, match=r"lstm\.step expects x of shape \(3,\), got \(6, 3\).*vmap"
    ):
        run(LSTM, PARAMS, jnp.ones((2, T, I)))


def test_wrong_input_size_names_both_sizes():
    with pytest.raises(ValueError, match=r"expects x of shape \(3,\), got \(5,\).*input_size=3"):
        rj.scan(LSTM, PARAMS, jnp.ones((T, 5)))
    with pytest.raises(ValueError, match=r"gru\.step expects x of shape \(3,\), got \(\)"):
        gru = rj.cells.gru(H)
        rj.scan(gru, gru.init(KEY, I), jnp.ones(T))


def test_missing_time_axis():
    with pytest.raises(ValueError, match=r"xs of shape \(T, input_size\).*got shape \(\)"):
        rj.scan(LSTM, PARAMS, jnp.float32(1.0))


def test_errors_come_at_trace_time_under_jit():
    with pytest.raises(ValueError, match=r"got \(2, 6, 3\)|got \(6, 3\)"):
        jax.jit(lambda x: rj.scan(LSTM, PARAMS, x))(jnp.ones((2, T, I)))


def test_carry_of_wrong_structure():
    with pytest.raises(
        TypeError, match=r"expects a carry shaped like LSTMState\(h=\(4,\), c=\(4,\)\)"
    ):
        rj.scan(LSTM, PARAMS, XS, jnp.zeros(H))
    with pytest.raises(ValueError, match=r"carry shaped like .*got LSTMState\(h=\(2, 4\).*vmap"):
        rj.scan(LSTM, PARAMS, XS, rj.LSTMState(jnp.zeros((2, H)), jnp.zeros((2, H))))
    with pytest.raises(TypeError, match=r"tuple of 2 carries.*got list of length 3"):
        bi = rj.layers.bidirectional(rj.layers.rnn(LSTM), rj.layers.rnn(LSTM))
        bi.apply(bi.init(KEY, I), XS, carry=[None, None, None])


@pytest.mark.parametrize("n", [-1, T + 1])
def test_length_outside_range(n):
    with pytest.raises(ValueError, match=rf"length in \[0, T\] = \[0, {T}\], got {n}"):
        rj.scan(LSTM, PARAMS, XS, length=n)


def test_length_and_mask_types():
    with pytest.raises(TypeError, match="integer length, got dtype float32"):
        rj.scan(LSTM, PARAMS, XS, length=jnp.float32(2))
    with pytest.raises(ValueError, match=r"length to be a scalar.*got shape \(2,\).*vmap"):
        rj.scan(LSTM, PARAMS, XS, length=jnp.array([2, 3]))
    with pytest.raises(ValueError, match="length= or mask=, not both"):
        rj.scan(LSTM, PARAMS, XS, length=2, mask=np.ones(T, bool))
    with pytest.raises(ValueError, match=r"mask of shape \(T,\) = \(6,\), got \(2, 6\)"):
        rj.scan(LSTM, PARAMS, XS, mask=np.ones((2, T), bool))
    with pytest.raises(TypeError, match="boolean mask, got dtype int"):
        rj.scan(LSTM, PARAMS, XS, mask=np.ones(T, np.int32))


def test_unknown_option_strings_list_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"activation must be one of 'tanh', 'relu'; got 'sigmoid'"
    ):
        rj.cells.elman(H, activation="sigmoid")
    with pytest.raises(
        ValueError, match=r"merge must be one of 'concat', 'sum', 'mean', 'mul'; got 'max'"
    ):
        lstm = rj.layers.rnn(LSTM)
        rj.layers.bidirectional(lstm, lstm, merge="max")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: rj.cells.lstm(0), "lstm expects hidden_size to be a positive int, got 0"),
        (lambda: rj.cells.gru(4.0), "gru expects hidden_size to be a positive int, got 4.0"),
        (lambda: rj.cells.gru(4, reset_after="yes"), "reset_after must be True or False"),
        (lambda: LSTM.init(KEY, -2), "lstm.init expects input_size to be a positive int"),
        (lambda: rj.scan(LSTM, PARAMS, XS, unroll=0), "unroll to be a positive int or True, got 0"),
        (lambda: rj.scan(LSTM, PARAMS, XS, remat="yes"), "remat to be True or False"),
        (lambda: rj.layers.rnn(rj.layers.dense(2)), "rnn expects an rnnjax.Cell, got Layer"),
        (lambda: rj.layers.stack(), "stack expects at least one layer"),
        (
            lambda: rj.layers.stack(LSTM),
            "got Cell at position 0: wrap a cell with rnnjax.layers.rnn",
        ),
        (lambda: rj.layers.stack(rj.layers.dense(2), dropout=1.0), r"dropout in \[0, 1\), got 1.0"),
        (lambda: rj.layers.dense(0), "dense expects out_size to be a positive int"),
    ],
)
def test_bad_configuration(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_dense_input_errors():
    head = rj.layers.dense(2)
    params = head.init(KEY, H)
    with pytest.raises(
        ValueError, match=r"dense expects xs of shape \(T, 4\), got \(2, 6, 4\): vmap"
    ):
        head.apply(params, jnp.ones((2, T, H)))
    with pytest.raises(ValueError, match=r"dense expects xs of shape \(T, 4\), got \(6, 3\)"):
        head.apply(params, XS)
    with pytest.raises(TypeError, match="dense has no carry"):
        head.apply(params, jnp.ones((T, H)), carry=jnp.zeros(2))
