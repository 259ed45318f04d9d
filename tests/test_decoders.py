# Tests of extras/decoders.py: prompt lookup, the sliding window and Jacobi Forcing's multi-block
# decoding (with and without rejection recycling) are exactly greedy decoding.
# Run: python -m pytest -q tests/test_decoders.py   (on a GPU too: add --device=cuda; every input
# is built with conftest's helpers, on DEVICE)
import itertools
from collections import deque

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, committed_per_pass, make_model, random_prompt, recorded_forwards, tensor
from extras.decoders import (lookup_draft, multiblock_decode, prompt_lookup_decode, recycled,
                             sliding_window_jacobi_decode)
from jacobi import greedy_decode, jacobi_decode
from model import GPTConfig


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
          window=lambda *a, **k: sliding_window_jacobi_decode(*a, **k, n=n, blocks=1 + seed, seed=seed),
          multiblock=lambda *a, **k: multiblock_decode(*a, **k, n=n, K=1 + seed, r=(0.85, 0.3, 0.5)[seed],
                                                       seed=seed),
          recycling=lambda *a, **k: multiblock_decode(*a, **k, n=n, K=1 + seed % 2, pool_size=2 + seed,
                                                      seed=seed))


@pytest.mark.parametrize("n", [1, 3, 16])
def test_eos_inside_a_draft(models, n):
    model = models["repetitive"]
    for seed in range(4):
        prompt = random_prompt(5, seed=seed, vocab_size=6)
        free = greedy_decode(model, prompt, 40)
        eos_id = int(free[len(free) // 2])
        greedy = check(model, prompt, 40, eos_id,
                       lookup=lambda *a, **k: prompt_lookup_decode(*a, **k, draft_len=n),
                       window=lambda *a, **k: sliding_window_jacobi_decode(*a, **k, n=n, seed=seed),
                       multiblock=lambda *a, **k: multiblock_decode(*a, **k, n=n, r=0.3, pool_size=4,
                                                                    seed=seed))
        assert greedy[-1] == eos_id and eos_id not in greedy[:-1].tolist()


@pytest.mark.parametrize("P", [40, 63, 64])
def test_decoders_stop_at_the_context_limit(models, P):
    greedy = check(models["repetitive"], random_prompt(P, seed=P, vocab_size=6), 1000,
                   lookup=prompt_lookup_decode,
                   window=lambda *a, **k: sliding_window_jacobi_decode(*a, **k, n=16, blocks=3),
                   multiblock=lambda *a, **k: multiblock_decode(*a, **k, n=16, K=3, r=0.3, pool_size=4))
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


def test_the_multiblock_decoder_keeps_the_promoted_blocks_draft():
    """On test_jacobi.constant_model (always 3), n = 8, r = 0.1: the first pass commits one token
    and makes the active block's tail 3s; that is ceil(0.1 * 8) = 1 accepted token, so a
    pseudo-active block is spawned after it, drafted from that tail (3s) and one guess. The
    second pass confirms the tail (7 tokens, never past the active block) and refines the pseudo
    block to all 3s; promoted, it is verified whole by the third pass: 16 tokens in 3 passes,
    where plain Jacobi (K = 1) starts the second block from a fresh guess and needs 4."""
    from test_jacobi import constant_model
    model, prompt = constant_model(), tensor([1, 2, 4, 5])
    tokens, stats = multiblock_decode(model, prompt, 16, n=8, K=2, r=0.1)
    assert tokens.tolist() == [3] * 16 and stats.accepted == [1, 7, 8]
    assert multiblock_decode(model, prompt, 16, n=8, K=1, r=0.1)[1].accepted == [1, 7, 1, 7]


class Successor(torch.nn.Module):
    """A stand-in model whose argmax is always the input token + 1 (mod V), so that every Jacobi
    update is worked by hand: y_i^(j+1) = y_{i-1}^(j) + 1. It records each forward's inputs."""

    def __init__(self, V=50):
        super().__init__()
        self.config = GPTConfig(block_size=64, vocab_size=V)
        self.lm_head = torch.nn.Linear(1, V, bias=False).to(DEVICE)  # (where the model lives)
        self.inputs = []

    def make_cache(self, batch_size=1):
        return None

    def forward(self, idx, input_pos=None, cache=None):
        self.inputs.append(idx[0].tolist())
        return F.one_hot((idx + 1) % self.config.vocab_size, self.config.vocab_size).float(), None


def test_pseudo_active_blocks_freeze_what_they_accept():
    """Prompt [0], n = 4, K = 2, r = 0.25 (a block is spawned after 1 accepted token), guesses
    repeat the last token. Each pass commits one token (the drafts are always one step behind).
    Pass 1 commits 1 and spawns the block at positions 5-8, drafted 1 1 1 1. From pass 2 on that
    block freezes one more leading token per pass (its first update: 2 at position 5, then 3 at 6,
    4 at 7), which later passes feed unchanged while the tokens around them move on; promoted at
    pass 5, its draft is what it froze."""
    model = Successor()
    tokens, stats = multiblock_decode(model, tensor([0]), 8, n=4, K=2, r=0.25, guess="repeat")
    assert tokens.tolist() == list(range(1, 9)) and stats.accepted[:5] == [1, 1, 1, 1, 1]
    assert model.inputs[:5] == [[0, 0, 0, 0],              # positions 0-3
                                [1, 1, 1, 1, 1, 1, 1],     # 1-7: the pseudo block at 5-7 joins
                                [2, 2, 2, 2, 2, 2],        # 2-7: position 5 now frozen (2)
                                [3, 3, 2, 3, 3],           # 3-7: 2 stays at 5; 6 frozen (3)
                                [4, 2, 3, 4]]              # 4-7: the promoted block's draft


@pytest.mark.parametrize("n", [1, 4, 16])
def test_one_block_without_a_pool_is_jacobi_decoding(models, n):
    for seed in range(3):
        prompt = random_prompt(6, seed=seed)
        plain = jacobi_decode(models[1.0], prompt, 30, n=n, seed=seed)
        multi = multiblock_decode(models[1.0], prompt, 30, n=n, K=1, seed=seed)
        assert multi[0].tolist() == plain[0].tolist() and multi[1].accepted == plain[1].accepted


def test_recycled_candidates_by_hand():
    pool = deque([[5, 1, 2, 3], [9, 9], [7, 1, 4, 4, 4], [1, 8]], maxlen=4)
    # every entry but the newest ([1, 8]), newest first: after the first 1 in each, cut to the
    # tail's 3 tokens or completed with the tail's own: [4, 4, 4], then [2, 3] + [6]
    assert recycled(pool, 1, [6, 6, 6]) == [[4, 4, 4], [2, 3, 6]]
    assert recycled(pool, 9, [6, 6, 6]) == []                    # one candidate is not used
    assert recycled(pool, 4, [4, 4]) == []                       # two found, both the tail itself
    assert recycled(deque([[1, 2], [1, 2], [0]]), 1, [5]) == [[2]]  # found twice, run once


def test_recycling_verifies_candidates_as_extra_rows(models):
    """On the repetitive model some passes carry candidate rows, and some of those commit more
    than the plain draft would: the decoding takes other passes than without a pool, with the
    same tokens (exactness is checked by the fuzz above)."""
    model, rows, differ = models["repetitive"], [], 0
    hook = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].size(0)))
    try:
        for seed in range(6):
            prompt = random_prompt(8, seed=seed, vocab_size=6)
            with_pool = multiblock_decode(model, prompt, 50, n=8, pool_size=4, seed=seed)
            without = multiblock_decode(model, prompt, 50, n=8, seed=seed)
            assert with_pool[0].tolist() == without[0].tolist()
            differ += with_pool[1].accepted != without[1].accepted
    finally:
        hook.remove()
    assert max(rows) > 1 and differ > 0
