"""seq2seq: an encoder-decoder that learns to add, written as text: ``"123+45"`` -> ``"168"``.

The encoder (the flags' recurrent stack, bidirectional if asked) reads the source characters;
its final state, projected when layers or directions give more than one state, starts a
decoder cell of the same hidden size, which writes the sum one character at a time and then an
end symbol. Training uses teacher forcing (the decoder reads the true previous character) and a
cross-entropy masked to each answer's length; evaluation decodes greedily and with beam search
and counts exact answers.

The decoder writes the sum least significant digit first, the order of addition by hand, where
each digit needs only the digits of its column and a carry; the answer is shown the usual way
round. (Written most significant digit first, the first character already needs every carry:
at the defaults that run reached 95% exact answers where this order reaches 99%.)

Each operand has 1 to D digits, equally likely, where ``--seq-len`` is the longest source,
``2 * D + 1`` characters (the default 7: up to three digits each). The validation problems are
fixed by the seed, distinct, and never appear in a training batch, so exact match measures
addition, not recall."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from rnnjax.data.text import CharVocab, DataError
from rnnjax.generate import beam_search, greedy_decode
from rnnjax.tasks.base import (
    PROJECTED_CELLS,
    Task,
    cell_layer,
    make_cell,
    recurrent_layers,
    split_keys,
)
from rnnjax.tasks.flags import number
from rnnjax.train import accuracy, cross_entropy

DEFAULTS = {
    "cell": "gru",  # on this problem it learns faster per second of CPU than an LSTM
    "hidden": 128,
    "steps": 5000,
    "batch_size": 256,
    "seq_len": 7,
    "lr": 1e-3,  # 2e-3 gets there sooner but swings by a few points of exact match
    "checkpoint_every": 1000,
    "eval_every": 500,
}
EMBED = 32
VAL_SIZE = 1000
BEAM_SIZE = 4
EXAMPLES = 6  # validation problems shown by report
MAX_DIGITS = 9  # a * 10**D + b, the key of a problem, fits in int64

PAD, START, END = "\x00", "\x02", "\x03"  # NUL, start of text, end of text
VOCAB = CharVocab(("\ufffd", PAD, START, END, *"0123456789+"))
PAD_ID, START_ID, END_ID = (int(i) for i in VOCAB.encode(PAD + START + END))


def add_generate_flags(group) -> None:
    """``rnnjax generate --run DIR`` of a seq2seq run: answer one problem."""
    group.add_argument(
        "--prompt", metavar="A+B",
        help="the problem to answer, two numbers of at most the run's digits "
        "(default: none: a random problem drawn with --seed)",
    )  # fmt: skip
    group.add_argument(
        "--seed", type=number(int, 0), default=0,
        help="draws the problem when there is no --prompt (default: 0)",
    )  # fmt: skip


class PromptError(DataError):
    """A source string the model cannot read (the ``rnnjax`` command prints it as one line)."""


class Batch(NamedTuple):
    """Padded, encoded problems. Shapes: ``source (B, S)``, ``source_len (B,)``,
    ``decoder_in`` and ``decoder_out (B, T)``, ``decoder_len (B,)``: ``decoder_in`` is START then
    the answer, ``decoder_out`` the answer then END (the same characters shifted by one)."""

    source: np.ndarray
    source_len: np.ndarray
    decoder_in: np.ndarray
    decoder_out: np.ndarray
    decoder_len: np.ndarray


def digits_for(seq_len: int) -> int:
    """Digits per operand for sources of at most ``seq_len`` characters (``2 * D + 1``)."""
    if not 3 <= seq_len <= 2 * MAX_DIGITS + 1:
        raise DataError(
            f"--seq-len {seq_len} does not fit the seq2seq task: it is the longest source "
            f"'A+B', 2*D+1 characters for D-digit operands, so 3 to {2 * MAX_DIGITS + 1} "
            "(the default 7: three digits each)"
        )
    return (seq_len - 1) // 2


def span(d: int) -> tuple[int, int]:
    """The ``d``-digit numbers: ``(first, how many)``, 0..9 for one digit."""
    return (0, 10) if d == 1 else (10 ** (d - 1), 9 * 10 ** (d - 1))


def draw(rng: np.random.Generator, n: int, digits: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` problems, two int64 arrays of operands: each operand has 1 to ``digits`` digits
    (equally likely), then any value of that length (equally likely)."""

    def operands():
        first, count = np.array([span(d) for d in range(1, digits + 1)]).T
        d = rng.integers(0, digits, n)
        return first[d] + rng.integers(0, count[d])

    return operands(), operands()


def answer_distribution(digits: int) -> np.ndarray:
    """``p[s]``, the probability that a drawn problem's answer is ``s``."""
    p = np.zeros(10**digits)
    for d in range(1, digits + 1):
        first, count = span(d)
        p[first : first + count] = 1 / (digits * count)
    return np.convolve(p, p)


def make_batch(a: np.ndarray, b: np.ndarray, digits: int) -> Batch:
    """The problems ``a[i] + b[i]`` as a padded :class:`Batch` of fixed shape: sources of
    ``2 * digits + 1`` steps and answers of ``digits + 2`` (the longest sum and END).

    >>> batch = make_batch(np.array([95]), np.array([7]), 2)  # 95+7=102, written "201"
    >>> VOCAB.decode(batch.decoder_in[0])[1:], VOCAB.decode(batch.decoder_out[0])[:-1]
    ('201', '201')
    >>> batch.source_len.tolist(), batch.decoder_len.tolist(), decode_answer(batch.decoder_out[0])
    ([4], [4], '102')
    """
    sources = [f"{x}+{y}" for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    answers = [str(x + y) for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    return text_batch(sources, answers, digits)


def text_batch(sources: list[str], answers: list[str], digits: int) -> Batch:
    """Source and answer strings as a :class:`Batch`; the answers are written least
    significant digit first (``""`` for sources still to be answered)."""
    S, T = 2 * digits + 1, digits + 2
    n = len(sources)
    source = np.full((n, S), PAD_ID, np.int32)
    decoder_in = np.full((n, T), PAD_ID, np.int32)
    decoder_out = np.full((n, T), PAD_ID, np.int32)
    source_len = np.array([len(s) for s in sources], np.int32)
    decoder_len = np.array([len(t) + 1 for t in answers], np.int32)
    for i, (s, t) in enumerate(zip(sources, answers, strict=True)):
        t = t[::-1]
        source[i, : len(s)] = VOCAB.encode(s)
        decoder_in[i, : len(t) + 1] = VOCAB.encode(START + t)
        decoder_out[i, : len(t) + 1] = VOCAB.encode(t + END)
    return Batch(source, source_len, decoder_in, decoder_out, decoder_len)


def decode_answer(tokens) -> str:
    """The answer in decoded tokens: those before the first END, turned the usual way round."""
    tokens = np.asarray(tokens).tolist()
    if END_ID in tokens:
        tokens = tokens[: tokens.index(END_ID)]
    return VOCAB.decode(tokens)[::-1]


def validation_problems(seed: int, digits: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed validation problems, distinct: for each pair of operand lengths, an equal
    share of ``VAL_SIZE``, but at most a quarter of the problems of those lengths (there are
    only 100 with two one-digit operands), so that most of them remain for training."""
    # Three entropy words: no training step's [seed, step] gives this stream.
    rng = np.random.default_rng([seed, 0, 1])
    share = -(-VAL_SIZE // digits**2)
    a, b = [], []
    for d_a, d_b in itertools.product(range(1, digits + 1), repeat=2):
        (first_a, count_a), (first_b, count_b) = span(d_a), span(d_b)
        pairs = rng.choice(count_a * count_b, min(share, count_a * count_b // 4), replace=False)
        a.append(first_a + pairs // count_b)
        b.append(first_b + pairs % count_b)
    return np.concatenate(a), np.concatenate(b)


def training_batch(seed: int, step: int, batch_size: int, digits: int, held_out: np.ndarray):
    """Batch ``step``: ``batch_size`` problems drawn with ``default_rng([seed, step])``, any
    problem in ``held_out`` (as ``a * 10**digits + b``) drawn again."""
    rng = np.random.default_rng([seed, step])
    a, b = draw(rng, batch_size, digits)
    while (clash := np.isin(a * 10**digits + b, held_out)).any():
        a[clash], b[clash] = draw(rng, int(clash.sum()), digits)
    return make_batch(a, b, digits)


class Seq2Seq(NamedTuple):
    """The encoder-decoder, for one problem at a time (vmap over a batch).

    Attributes:
      params: ``{"embed", "encoder", "decoder", "bridge", "head"}``, freshly initialised.
      encode: ``(params, source (S,), source_len, key=None) -> carry``, the decoder's start.
      forward: ``(params, source, source_len, decoder_in (T,), decoder_len, key=None) ->
        logits (T, V)``, teacher forcing: step t reads ``decoder_in[t]``, the answer's
        character t - 1 (START at t = 0), and predicts character t.
      step: ``(params, carry, token ()) -> (carry, logits (V,))``, one decoding step, the one
        :func:`~rnnjax.generate.greedy_decode` and :func:`~rnnjax.generate.beam_search` take.
    """

    params: dict
    encode: Callable
    forward: Callable
    step: Callable


def model(config: dict) -> Seq2Seq:
    """The encoder-decoder the flags describe (``cell``, ``hidden``, ``layers``,
    ``bidirectional``, ``dropout``, ``recurrent_dropout``, ``seed``)."""
    H, V = config["hidden"], VOCAB.size
    embed = rj.layers.embed(V, EMBED)  # one table for source and answer characters
    encoder = recurrent_layers(config)
    cell = make_cell(config, H)
    decoder = cell_layer(config, cell)  # behind a projection to H for rglru and lru
    projects = config["cell"] in PROJECTED_CELLS
    head = rj.layers.dense(V)
    k_embed, k_enc, k_dec, k_bridge, k_head = split_keys(config, 5)
    params = {
        "embed": embed.init(k_embed, 1),
        "encoder": encoder.init(k_enc, EMBED),
        "decoder": decoder.init(k_dec, EMBED),
        "head": head.init(k_head, H),
    }
    # The encoder ends with one carry per layer and direction, the decoder starts from one.
    # With several, each carry leaf that is a hidden-size real vector (h, and c for an LSTM) is
    # concatenated across them and projected back to H by a tanh layer of its own; any other
    # leaf (the LRU's complex state, the mLSTM's matrix memory, normaliser and stabiliser) is
    # their mean, which is a state of the same kind (a projection of an H x H memory would
    # need H^4 weights).
    n_states = config["layers"] * (2 if config["bidirectional"] else 1)
    bridge = rj.layers.dense(H, activation=jnp.tanh)
    cell_params = params["decoder"]["rnn"] if projects else params["decoder"]
    start = cell.initial_carry(cell_params)
    vectors = [leaf.shape == (H,) and not jnp.iscomplexobj(leaf) for leaf in jax.tree.leaves(start)]
    params["bridge"] = (
        [bridge.init(k, n_states * H) for k in jax.random.split(k_bridge, sum(vectors))]
        if n_states > 1
        else []
    )

    def encode(params, source, source_len, key=None):
        _, x = embed.apply(params["embed"], source, length=source_len)
        carries, _ = encoder.apply(params["encoder"], x, length=source_len, key=key)
        if config["bidirectional"]:
            carries = [c for pair in carries for c in pair]
        if n_states == 1:
            return carries[0]
        per_leaf = [jax.tree.leaves(c) for c in carries]
        projections = iter(params["bridge"])
        joined = []
        for i, vector in enumerate(vectors):
            leaves = [leaves[i] for leaves in per_leaf]
            if vector:
                joined.append(bridge.apply(next(projections), jnp.concatenate(leaves)[None])[1][0])
            else:
                joined.append(sum(leaves) / len(leaves))
        return jax.tree.unflatten(jax.tree.structure(start), joined)

    def forward(params, source, source_len, decoder_in, decoder_len, key=None):
        k_enc, k_dec = (None, None) if key is None else jax.random.split(key)
        carry = encode(params, source, source_len, k_enc)
        _, x = embed.apply(params["embed"], decoder_in, length=decoder_len)
        _, h = decoder.apply(params["decoder"], x, carry=carry, length=decoder_len, key=k_dec)
        return head.apply(params["head"], h, length=decoder_len)[1]

    def step(params, carry, token):
        _, x = embed.apply(params["embed"], token[None])
        x = x[0]
        if projects:
            x = x @ params["decoder"]["proj"]["w"] + params["decoder"]["proj"]["b"]
        carry, h = cell.step(params["decoder"]["rnn"] if projects else params["decoder"], carry, x)
        return carry, head.apply(params["head"], h[None])[1][0]

    return Seq2Seq(params, encode, forward, step)


def build(config: dict, run_dir: Path) -> Task:
    digits = digits_for(config["seq_len"])
    seed, batch_size = config["seed"], config["batch_size"]
    T = digits + 2  # answer steps: the longest sum and END

    val_a, val_b = validation_problems(seed, digits)
    val = make_batch(val_a, val_b, digits)
    held_out = np.sort(val_a * 10**digits + val_b)

    def train_data(step: int) -> Batch:
        return training_batch(seed, step, batch_size, digits, held_out)

    # The trivial baseline: always give the most common answer of the training distribution.
    common = int(answer_distribution(digits).argmax())
    baseline_exact = float(np.mean(val_a + val_b == common))

    net = model(config)

    def loss_fn(params, batch, key):
        source, source_len, decoder_in, decoder_out, decoder_len = batch
        keys = None if key is None else jax.random.split(key, source.shape[0])
        one = lambda s, n, x, m, k: net.forward(params, s, n, x, m, k)  # noqa: E731
        in_axes = (0, 0, 0, 0, None if keys is None else 0)
        logits = jax.vmap(one, in_axes)(source, source_len, decoder_in, decoder_len, keys)
        loss = cross_entropy(logits, decoder_out, lengths=decoder_len)
        return loss, {"token_accuracy": accuracy(logits, decoder_out, lengths=decoder_len)}

    @jax.jit
    @functools.partial(jax.vmap, in_axes=(None, 0, 0))
    def decode(params, source, source_len):
        """Sources ``(B, S)`` -> greedy and beam-search answer tokens, ``(B, T)`` each."""
        carry = net.encode(params, source, source_len)
        greedy = greedy_decode(net.step, params, carry, START_ID, T, end_token=END_ID)
        beam, _ = beam_search(net.step, params, carry, START_ID, END_ID, T, BEAM_SIZE)
        return greedy, beam

    # An answer is exact when every token up to and including END matches; past END both the
    # decoders and this target hold END.
    expected = np.where(np.arange(T) < val.decoder_len[:, None], val.decoder_out, END_ID)

    @jax.jit
    def evaluate(params):
        loss, metrics = loss_fn(params, val, None)
        greedy, beam = decode(params, val.source, val.source_len)
        return {
            "loss": loss,
            "token_accuracy": metrics["token_accuracy"],
            "exact_match": jnp.mean(jnp.all(greedy == expected, axis=1)),
            "exact_match_beam": jnp.mean(jnp.all(beam == expected, axis=1)),
            "baseline_exact_match": baseline_exact,
        }

    def answer(params, sources: list[str]) -> list[tuple[str, str]]:
        """The greedy and the beam-search answer to each source string."""
        batch = text_batch(sources, ["" for _ in sources], digits)
        greedy, beam = decode(params, batch.source, batch.source_len)
        return [(decode_answer(g), decode_answer(b)) for g, b in zip(greedy, beam, strict=True)]

    def generate(params, options) -> str:
        """``options.prompt`` ('A+B'; if None, a random problem drawn with ``options.seed``)
        answered greedily and by beam search: ``"123+45 -> 168 (beam: 168)"``."""
        prompt = options.prompt
        if prompt is None:
            a, b = draw(np.random.default_rng([options.seed, 0, 2]), 1, digits)
            prompt = f"{a[0]}+{b[0]}"
        check_prompt(prompt, digits)
        ((greedy, beam),) = answer(params, [prompt])
        return f"{prompt} -> {greedy} (beam: {beam})"

    def report(params, run_dir):
        metrics = {k: float(v) for k, v in evaluate(params).items()}
        picks = np.linspace(0, len(val_a) - 1, EXAMPLES).astype(int)  # all operand lengths
        a, b = val_a[picks].tolist(), val_b[picks].tolist()
        sources = [f"{x}+{y}" for x, y in zip(a, b, strict=True)]
        lines = [
            f"validation exact match: greedy {metrics['exact_match']:.3f}, beam search "
            f"{metrics['exact_match_beam']:.3f} (beam {BEAM_SIZE}); token accuracy "
            f"{metrics['token_accuracy']:.3f}; baseline (always answer {common}) "
            f"{baseline_exact:.3f}",
            "validation examples:",
        ]
        for x, y, src, (greedy, beam) in zip(a, b, sources, answer(params, sources), strict=True):
            verdict = "right" if greedy == str(x + y) else f"wrong, expected {x + y}"
            lines.append(f"  {src} -> {greedy} (beam: {beam})  [{verdict}]")
        return lines

    return Task(
        params=net.params, loss_fn=loss_fn, train_data=train_data, evaluate=evaluate,
        metric="exact_match", report=report, generate=generate,
        info={"digits": digits, "val_size": len(val_a), "baseline_answer": common},
    )  # fmt: skip


def check_prompt(prompt: str, digits: int) -> None:
    """Raise :class:`PromptError` unless ``prompt`` is ``'A+B'`` with operands of at most
    ``digits`` digits."""
    a, plus, b = prompt.partition("+")
    if (
        not (plus and a.isdigit() and b.isdigit() and a.isascii() and b.isascii())
        or max(len(a), len(b)) > digits
    ):
        raise PromptError(
            f"the seq2seq model adds two numbers of up to {digits} digits written as 'A+B' "
            f"(e.g. --prompt 123+45); got {prompt!r}"
        )
