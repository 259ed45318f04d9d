# Tests of extras/decoders.py: prompt lookup and the sliding window are exactly greedy decoding.
# Run: python -m pytest -q tests/test_decoders.py   (on a GPU too: add --device=cuda; every input
# is built with conftest's helpers, on DEVICE)
import itertools

import pytest

from conftest import committed_per_pass, make_model, random_prompt, recorded_forwards, tensor
from extras.decoders import lookup_draft, prompt_lookup_decode, sliding_window_jacobi_decode
from jacobi import greedy_decode


@pytest.fixture(scope="module")
def models():
    # scale 8 is chaotic; the small vocabulary of the third makes its outputs repeat themselves,
    # so prompt lookup finds long drafts that are partly right
    return {1.0: make_model(seed=11), 8.0: make_model(seed=12, scale=8.0),
            "repetitive": make_model(seed=14, vocab_size=6, scale=3.0)}


def check(model, prompt, max_new_tokens, eos_id=None, **decoders):
    """Every decoder's output equals greedy_decode's; its statistics equal what the model was
    called with (counted outside the decoder, as in test_jacobi.assert_all_agree)."""
    greedy = greedy_decode(model, prompt, max_new_tokens, eos_id)
    for name, decode in decoders.items():
        with recorded_forwards(model) as passes:
            tokens, stats = decode(model, prompt, max_new_tokens, eos_id=eos_id)
        assert tokens.tolist() == greedy.tolist(), name
        assert stats.tokens == len(greedy) and stats.forwards == len(passes), name
        assert stats.accepted == committed_per_pass(passes, len(prompt), len(greedy)), name
        assert all(a >= 1 for a in stats.accepted)
    return greedy


FUZZ = list(itertools.product([1.0, 8.0, "repetitive"], [1, 4, 17], [1, 2, 5, 16], range(3)))


@pytest.mark.parametrize("model_key,P,n,seed", FUZZ)
def test_decoders_equal_greedy_fuzz(models, model_key, P, n, seed):
    vocab = models[model_key].config.vocab_size
    prompt = random_prompt(P, seed=100 * n + seed, vocab_size=vocab)
    check(models[model_key], prompt, 11 + 5 * seed,
          lookup=lambda *a, **k: prompt_lookup_decode(*a, **k, ngram=1 + seed, draft_len=n),
          window=lambda *a, **k: sliding_window_jacobi_decode(*a, **k, n=n, blocks=1 + seed, seed=seed))


@pytest.mark.parametrize("n", [1, 3, 16])
def test_eos_inside_a_draft(models, n):
    model = models["repetitive"]
    for seed in range(4):
        prompt = random_prompt(5, seed=seed, vocab_size=6)
        free = greedy_decode(model, prompt, 40)
        eos_id = int(free[len(free) // 2])
        greedy = check(model, prompt, 40, eos_id,
                       lookup=lambda *a, **k: prompt_lookup_decode(*a, **k, draft_len=n),
                       window=lambda *a, **k: sliding_window_jacobi_decode(*a, **k, n=n, seed=seed))
        assert greedy[-1] == eos_id and eos_id not in greedy[:-1].tolist()


@pytest.mark.parametrize("P", [40, 63, 64])
def test_decoders_stop_at_the_context_limit(models, P):
    greedy = check(models["repetitive"], random_prompt(P, seed=P, vocab_size=6), 1000,
                   lookup=prompt_lookup_decode,
                   window=lambda *a, **k: sliding_window_jacobi_decode(*a, **k, n=16, blocks=3))
    assert len(greedy) == 64 - P


def test_lookup_draft():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3], ngram=3, length=4) == [9, 1, 2, 3]
    assert lookup_draft([5, 1, 2, 7, 1, 2], ngram=3, length=1) == [7]       # falls back to 2 tokens
    assert lookup_draft([1, 2, 1, 3, 1], ngram=2, length=2) == [3, 1]       # the latest occurrence
    assert lookup_draft([1, 2, 3], ngram=3, length=4) == []
    assert lookup_draft([4], ngram=3, length=4) == []


def test_lookup_drafts_are_used_on_repetitive_text(models):
    model = models["repetitive"]
    _, stats = prompt_lookup_decode(model, random_prompt(8, seed=1, vocab_size=6), 50)
    assert max(stats.accepted) > 1  # some drafted tokens were right and committed at once


def test_the_sliding_window_commits_past_its_first_block():
    """On a model whose output ignores its context (test_jacobi.constant_model: always 3) the
    first pass gets one token right from guesses drawn from a prompt without a 3, and makes the
    whole window 3s; the second pass confirms the window and commits all of it, 7 tokens, more
    than a block of n = 4 holds: only a window of blocks * n tokens can."""
    from test_jacobi import constant_model
    model, n = constant_model(), 4
    prompt = tensor([1, 2, 4, 5])
    tokens, stats = sliding_window_jacobi_decode(model, prompt, 8, n=n, blocks=2)
    assert tokens.tolist() == [3] * 8
    assert stats.accepted == [1, 7] and max(stats.accepted) > n
