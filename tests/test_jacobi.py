# Tests of jacobi.py: Jacobi decoding is exactly greedy decoding, with honest statistics.
# Run: python -m pytest -q tests/test_jacobi.py   (on a GPU too: add --device=cuda; every input is
# built with conftest's helpers, on DEVICE)
import itertools

import pytest
import torch

from conftest import (DEVICE, committed_per_pass, make_model, passes_per_block, random_prompt,
                      recorded_forwards, tensor)
from jacobi import (greedy_decode, initial_guess, jacobi_decode, jacobi_decode_reference, seeded,
                    stationary_tokens)

BLOCK_SIZES = [1, 2, 3, 7, 16, 33]



def assert_all_agree(model, prompt, max_new_tokens, n, eos_id=None, seed=0, guess="prefix"):
    """greedy == Jacobi (cached) == Jacobi (reference), tokens and trajectories; the statistics
    equal what the model was called with."""
    greedy = greedy_decode(model, prompt, max_new_tokens, eos_id)
    with recorded_forwards(model) as passes:  # counted outside the decoder
        tokens, stats = jacobi_decode(model, prompt, max_new_tokens, n, eos_id, guess, seed)
    ref_tokens, ref_trajectory = jacobi_decode_reference(model, prompt, max_new_tokens, n, eos_id,
                                                         guess, seed)
    assert tokens.tolist() == greedy.tolist()
    assert ref_tokens.tolist() == greedy.tolist()
    assert len(stats.trajectory) == len(ref_trajectory)
    for block, ref in zip(stats.trajectory, ref_trajectory):
        assert torch.equal(block.prefix, ref.prefix)
        assert torch.equal(block.states, ref.states)  # same states y^(0) .. y*, in order
    # the statistics, against counts that do not come from them: greedy's output, the forward
    # passes the model saw, and what each pass committed, read off where the next one starts
    assert stats.tokens == len(greedy)
    assert stats.forwards == len(passes)
    assert stats.accepted == committed_per_pass(passes, len(prompt), len(greedy))
    assert stats.iterations == passes_per_block(passes)
    assert stats.fast_forwarded == len(greedy) - len(passes)
    assert all(a >= 1 for a in stats.accepted)
    assert all(it <= n for it in stats.iterations)  # a block converges in at most n passes
    # the fixed points, block after block, are the output; each prefix is everything before it
    if tokens.numel():
        assert torch.equal(torch.cat([b.fixed_point for b in stats.trajectory]), tokens)
    for k, block in enumerate(stats.trajectory):
        done = sum(len(b.fixed_point) for b in stats.trajectory[:k])
        assert torch.equal(block.prefix, torch.cat([prompt, tokens[:done]]))
        assert block.states.size(1) <= n
    return greedy, stats


# the fuzz: models x prompt lengths x block sizes x seeds, lengths not multiples of n
FUZZ = [(scale, P, n, seed) for scale, P, n, seed in
        itertools.product([1.0, 8.0], [1, 4, 17], BLOCK_SIZES, range(5))]


@pytest.fixture(scope="module")
def models():
    return {1.0: make_model(seed=11), 8.0: make_model(seed=12, scale=8.0)}


@pytest.mark.parametrize("scale,P,n,seed", FUZZ)
def test_jacobi_equals_greedy_fuzz(models, scale, P, n, seed):
    prompt = random_prompt(P, seed=100 * n + seed)
    assert_all_agree(models[scale], prompt, max_new_tokens=11 + 5 * seed, n=n, seed=seed)


@pytest.mark.parametrize("n", BLOCK_SIZES)
def test_eos_inside_a_block(models, n):
    """Pick as EOS a token that greedy emits mid-output: every decoder stops right after it."""
    model = models[8.0]
    for seed in range(4):
        prompt = random_prompt(5, seed=seed)
        free = greedy_decode(model, prompt, 40)
        eos_id = int(free[len(free) // 2])
        stop = free.tolist().index(eos_id) + 1
        greedy, stats = assert_all_agree(model, prompt, 40, n, eos_id=eos_id, seed=seed)
        assert greedy.tolist() == free[:stop].tolist()
        assert greedy[-1] == eos_id


@pytest.mark.parametrize("n", [1, 3, 16, 33])
def test_generation_stops_at_the_context_limit(models, n):
    model = models[8.0]  # block_size 64
    for P in (40, 63, 64):
        greedy, stats = assert_all_agree(model, random_prompt(P, seed=P), 1000, n)
        assert len(greedy) == 64 - P


def test_prompt_of_one_token_and_zero_new_tokens(models):
    model = models[1.0]
    assert_all_agree(model, random_prompt(1, seed=0), 20, 4)
    tokens, stats = jacobi_decode(model, random_prompt(3, seed=0), 0, n=4)
    assert tokens.numel() == 0 and stats.forwards == 0 and stats.tokens_per_forward == 0.0


def test_n_equals_one_is_one_token_per_forward(models):
    tokens, stats = jacobi_decode(models[8.0], random_prompt(6, seed=1), 30, n=1)
    assert stats.accepted == [1] * 30 and stats.forwards == 30 and stats.tokens_per_forward == 1.0


def test_repeat_init_is_exact_too(models):
    for n in (4, 16):
        assert_all_agree(models[8.0], random_prompt(7, seed=n), 30, n, guess="repeat")


def test_seeded_guesses_are_reproducible(models):
    prompt = random_prompt(9, seed=3)
    _, a = jacobi_decode(models[8.0], prompt, 20, n=8, seed=5)
    _, b = jacobi_decode(models[8.0], prompt, 20, n=8, seed=5)
    _, c = jacobi_decode(models[8.0], prompt, 20, n=8, seed=6)
    assert all(torch.equal(x.states, y.states) for x, y in zip(a.trajectory, b.trajectory))
    assert not torch.equal(a.trajectory[0].states[0], c.trajectory[0].states[0])


def test_initial_guess_draws_from_the_prefix():
    prefix = tensor([7, 8, 9])
    guess = initial_guess(prefix, 50, "prefix", seeded(0, DEVICE))
    assert set(guess.tolist()) == {7, 8, 9}
    assert initial_guess(prefix, 4, "repeat", None).tolist() == [9, 9, 9, 9]


def constant_model(token=3):
    """A model whose greedy output is always `token`: the last LayerNorm's output is a constant
    vector along that token's embedding, whatever the input."""
    model = make_model(seed=13)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[token] * 100)
    return model


def test_fast_forward_when_the_model_ignores_its_context():
    """Every guess of the first block is wrong; after one pass the whole block is right and the
    second pass commits it at once. Later blocks draw their guesses from a prefix full of 3s and
    are often right at once: at least n/2 tokens per forward."""
    model = constant_model()
    prompt = tensor([1, 2, 4, 5])  # no 3 in it: the guesses are all wrong
    greedy, stats = assert_all_agree(model, prompt, 32, n=8)
    assert greedy.tolist() == [3] * 32
    assert stats.iterations[0] == 2 and stats.accepted[:2] == [1, 7]
    assert all(it <= 2 for it in stats.iterations)
    assert stats.tokens_per_forward >= 4.0
    # one block, counted by hand: 8 tokens in 2 passes (1, then 7), 6 of them fast-forwarded
    _, one = jacobi_decode(model, prompt, 8, n=8)
    assert (one.tokens, one.forwards, one.accepted, one.iterations, one.fast_forwarded) == \
        (8, 2, [1, 7], [2], 6)


def test_stationary_tokens_on_hand_made_states():
    states = tensor([
        [9, 2, 9, 4],   # y^(0): tokens 1 and 3 are already right while token 0 is wrong
        [1, 2, 7, 4],   # token 3 right while token 2 is wrong; token 1 now joins the right prefix
        [1, 2, 3, 4],   # y*
    ])
    assert stationary_tokens(states).tolist() == [[False, True, False, True],
                                                  [False, False, False, True],
                                                  [False, False, False, False]]
    states = tensor([[5, 5, 5], [1, 5, 5], [1, 2, 5], [1, 2, 3]])  # one at a time
    assert not stationary_tokens(states).any()
    states = tensor([[1, 8, 3], [1, 2, 0], [1, 2, 3]])  # token 2 right, then wrong again
    assert not stationary_tokens(states).any()


def stationary_by_hand(states):
    """The definition in plain loops: positions right from some state on while a token before them
    in that state is wrong."""
    rows, fixed = states.tolist(), states[-1].tolist()
    return sum(any(all(r[i] == fixed[i] for r in rows[j:]) and rows[j][:i] != fixed[:i]
                   for j in range(len(rows)))
               for i in range(len(fixed)))


@pytest.mark.parametrize("seed", range(4))
def test_stationary_count_of_a_decode(models, seed):
    _, stats = jacobi_decode(models[8.0], random_prompt(6, seed=seed), 40, n=8, seed=seed)
    assert stats.stationary == sum(stationary_by_hand(b.states) for b in stats.trajectory)
    assert all(len(states) == it + 1 for (_, states, _), it in zip(stats.passes, stats.iterations))


@pytest.mark.parametrize("bad,match", [
    (dict(idx=torch.zeros(0, dtype=torch.long)), "prompt is empty"),
    (dict(idx=torch.zeros(65, dtype=torch.long)), "context is 64"),
    (dict(idx=torch.zeros(2, 5, dtype=torch.long)), "batch size 1"),
    (dict(idx=torch.tensor([1, 50])), "outside the vocabulary"),
    (dict(idx=torch.tensor([1.0, 2.0])), "LongTensor"),
    (dict(n=0), "block size n must be an integer >= 1"),
    (dict(n=-2), "block size n must be an integer >= 1"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(guess="zeros"), "unknown guess"),
])
def test_bad_input_gives_clear_errors(models, bad, match):
    args = dict(idx=torch.tensor([1, 2, 3]), max_new_tokens=5, n=4, guess="prefix") | bad
    args["idx"] = args["idx"].to(DEVICE)  # (else "the prompt is on cpu" comes first on a GPU)
    with pytest.raises(ValueError, match=match):
        jacobi_decode(models[1.0], **args)
    if set(bad) <= {"idx", "max_new_tokens"}:
        with pytest.raises(ValueError, match=match):
            greedy_decode(models[1.0], args["idx"], args["max_new_tokens"])
