"""
Extra (a learner may skip it): decoders past the paper's loop. Every one drafts future tokens,
runs them through the model in one forward pass with the KV cache, and commits the leading run
that the model's own argmax confirms, plus the one token a pass always gets right
(jacobi.accept). So their output is greedy_decode's, token for token (in float32, barring a
near-tie that another kernel shape rounds the other way); tests/test_decoders.py fuzzes that.

    prompt_lookup_decode          the draft is what followed the latest earlier occurrence of
                                  the last few tokens: training-free, the first thing to try
    sliding_window_jacobi_decode  Jacobi over a window of several blocks that slides on by
                                  every committed token: the tokens after the block being
                                  decoded are refined in the same passes
    multiblock_decode             Jacobi Forcing's multi-block decoding: one active block
                                  commits, pseudo-active blocks after it are refined alongside
                                  and verified again once promoted; with pool_size > 0 also its
                                  rejection recycling (rejected drafts tried as extra rows)

The sliding window is this project's own. Its window of blocks * n tokens is refreshed every pass
and the leading right run is committed wherever it ends, across block borders, at once; Jacobi
Forcing commits inside the active block only and starts a second block late (multiblock_decode).

All return (tokens, JacobiStats) like jacobi_decode, with forwards, accepted and seq filled in
(no blocks: no trajectory, no stationary tokens).
"""

import math
from collections import deque

import torch

from jacobi import JacobiStats, accept, check_inputs, initial_guess, seeded

RECYCLING_POOL = 4  # Jacobi Forcing's n-gram pool size (its released decoding's default)


def lookup_draft(tokens, ngram, length):
    """Up to `length` tokens that followed the latest earlier occurrence of the last k tokens of
    `tokens` (a list), for k = ngram down to 1; [] when none of them occurred before."""
    for k in range(min(ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-k:]
        for start in range(len(tokens) - k - 1, -1, -1):  # latest first, not the tail itself
            if tokens[start:start + k] == tail:
                return tokens[start + k:start + k + length]
    return []


@torch.no_grad()
def prompt_lookup_decode(model, idx, max_new_tokens, eos_id=None, ngram=3, draft_len=10):
    """Greedy decoding that verifies a draft copied from the text so far (prompt lookup).

    Each pass feeds the last committed token and a draft d_1 .. d_k from lookup_draft; the
    outputs y_1 .. y_k+1 at those positions commit y_1 (always right) and y_i+1 for as long as
    d_i == y_i. With no draft it is one greedy step.
    """
    prompt, budget = check_inputs(model, idx, max_new_tokens)
    P = len(prompt)
    seq = torch.cat([prompt, prompt.new_zeros(budget)])
    text = prompt.tolist()  # the final tokens, on the host, where the lookup happens
    stats, cache = JacobiStats(seq=seq), model.make_cache()
    done, cached, stop = P, 0, False
    while done < P + budget and not stop:
        draft = lookup_draft(text, ngram, min(draft_len, P + budget - done - 1))
        end = done + len(draft)  # the inputs are seq[cached:end]; outputs predict seq[done:end + 1]
        seq[done:end] = torch.tensor(draft, dtype=torch.long)  # (an upload from the host)
        logits, _ = model(seq[cached:end][None], input_pos=range(cached, end), cache=cache)
        y_next = logits[0, done - 1 - cached:].argmax(-1)
        outputs = y_next.tolist()  # the pass's device read
        accepted, stop = accept(outputs, draft + [None], eos_id)
        seq[done:done + accepted] = y_next[:accepted]
        text += outputs[:accepted]
        stats.accepted.append(accepted)
        done += accepted
        cached = done - 1  # the last committed token's keys were computed from its draft token
    stats.forwards = len(stats.accepted)
    return seq[P:done], stats


@torch.no_grad()
def sliding_window_jacobi_decode(model, idx, max_new_tokens, n=16, blocks=2, eos_id=None,
                                 guess="prefix", seed=0):
    """Jacobi decoding over a window of `blocks` * n tokens that slides on as tokens commit.

    Plain Jacobi refines one block and starts the next only once it has converged, from a fresh
    guess, so even a perfect CLLM needs two passes per block: one that predicts it from the
    guess, one that confirms it. Here every pass runs the whole unconverged window, the Jacobi
    update refines all of it, and the leading run of right tokens is committed wherever it ends,
    inside the first block or past it; then fresh guesses refill the window's end. So the pass
    that confirms one block also predicts the next one. The tokens past the first block are
    refined from an unconverged past: what Jacobi Forcing's noisy-stream training is for. Greedy's
    output, like every decoder here (tests/test_decoders.py).
    """
    prompt, budget = check_inputs(model, idx, max_new_tokens, n)
    if not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be an integer >= 1, got {blocks!r}")
    generator = seeded(seed, prompt.device)
    P = len(prompt)
    seq = torch.cat([prompt, prompt.new_zeros(budget)])
    stats, cache = JacobiStats(seq=seq), model.make_cache()
    done, cached, filled, stop = P, 0, P, False  # seq[done:filled] holds guesses
    while done < P + budget and not stop:
        end = min(done + n * blocks, P + budget)  # the window is seq[done:end]
        if filled < end:  # refill the window's end with guesses drawn from the final tokens
            seq[filled:end] = initial_guess(seq[:done], end - filled, guess, generator)
            filled = end
        logits, _ = model(seq[cached:end - 1][None], input_pos=range(cached, end - 1), cache=cache)
        y_next = logits[0, done - 1 - cached:].argmax(-1)  # the Jacobi update of the window
        outputs, drafted = torch.stack([y_next, seq[done:end]]).tolist()  # the pass's one device read
        accepted, stop = accept(outputs, drafted, eos_id)
        seq[done:end] = y_next
        stats.accepted.append(accepted)
        done += accepted
        cached = done - 1
    stats.forwards = len(stats.accepted)
    return seq[P:done], stats


def recycled(pool, key, tail):
    """Rejection recycling's candidates for the active block's tail (Jacobi Forcing): from every
    pool entry but the newest, newest first, the tokens after the first occurrence of key (the
    last committed token), cut to the tail's length or completed with the tail's own tokens.
    Nothing unless there are at least two (as theirs, counted before dropping the ones equal to
    the tail or to each other, which would only repeat a row). pool: token lists; tail: a list."""
    found = []
    for entry in list(pool)[-2::-1]:
        if key in entry:
            after = entry[entry.index(key) + 1:][:len(tail)]
            found.append(after + tail[len(after):])
    if len(found) < 2:
        return []
    return [c for i, c in enumerate(found) if c != tail and c not in found[:i]]


@torch.no_grad()
def multiblock_decode(model, idx, max_new_tokens, n=16, K=2, r=0.85, pool_size=0, eos_id=None,
                      guess="prefix", seed=0):
    """Jacobi Forcing's multi-block decoding (Hu, Kou et al. 2025), with rejection recycling
    when pool_size > 0.

    One *active* block commits, by jacobi.accept over its own tokens only. Once the newest block
    has ceil(r * n) accepted tokens, a *pseudo-active* block is spawned after it (up to K blocks
    in all), drafted from the active block's remaining tail (then guesses), and refined by the
    same passes from the unconverged tokens before it. A pseudo-active block "accepts" by the
    same rule, but against an unverified past: its accepted tokens are frozen, not committed.
    When the active block is complete the next block is promoted and its tokens, frozen or not,
    are verified again from its first token on: they are only its draft.

    Rejection recycling: after a pass that rejected part of the active block, the window's text
    and the rejected tail's update go into a pool of pool_size token lists; the next pass also
    verifies the tails that `recycled` draws from it, as extra rows of the same forward (the
    KV cache holds a row for each), and the row that commits most wins. A batched pass counts
    as one forward, as in theirs.

    Departures from Jacobi Forcing's released code, listed in docs/recipes.md: the promoted
    block's draft is kept (theirs returns after the first promotion and starts the next block
    from a fresh guess); guesses stand where theirs pads; the pool lives for the whole answer,
    not one block; candidates equal to the plain draft are not run; pseudo-active blocks are
    refined from the winning row (theirs: row 0). With K = 1 and no pool it is jacobi_decode.
    """
    prompt, budget = check_inputs(model, idx, max_new_tokens, n)
    if not isinstance(K, int) or K < 1 or not 0 < r <= 1 or pool_size < 0:
        raise ValueError(f"need K >= 1, 0 < r <= 1 and pool_size >= 0, got K={K!r}, r={r!r}, "
                         f"pool_size={pool_size!r}")
    generator = seeded(seed, prompt.device)
    P = len(prompt)
    limit = P + budget
    seq = torch.cat([prompt, prompt.new_zeros(budget)])
    stats, cache = JacobiStats(seq=seq), model.make_cache(batch_size=max(pool_size, 1))
    pool, spawn_at = deque(maxlen=pool_size), math.ceil(r * n)
    starts, frozen = [P], []  # each block's first position; each pseudo-active block's frozen tokens
    seq[P:min(P + n, limit)] = initial_guess(prompt, min(n, limit - P), guess, generator)
    done, cached, stop = P, 0, False
    while done < limit and not stop:
        active_end, end = min(starts[0] + n, limit), min(starts[-1] + n, limit)
        rows = seq[cached:end][None]  # (1, T): the final tokens not yet cached, then the drafts
        if pool_size:
            tail = seq[done - 1:active_end].tolist()  # (one more device read)
            candidates = recycled(pool, tail[0], tail[1:])
            if candidates:  # the same window with another draft of the active tail in each row
                rows = rows.repeat(1 + len(candidates), 1)
                rows[1:, done - cached:active_end - cached] = torch.tensor(candidates).to(seq.device)
        logits, _ = model(rows[:, :-1], input_pos=range(cached, end - 1), cache=cache)
        y_next = logits[:, done - 1 - cached:].argmax(-1)  # (R, end - done): the Jacobi update
        outputs, drafted = y_next.tolist(), rows[:, done - cached:].tolist()  # the pass's device read
        a = active_end - done  # the active block's tokens in the window
        verdicts = [accept(o[:a], d[:a], eos_id) for o, d in zip(outputs, drafted)]
        w = max(range(len(verdicts)), key=lambda i: verdicts[i][0])  # the first row that commits most
        accepted, stop = verdicts[w]
        for b, s in enumerate(starts[1:]):  # pseudo-active blocks: freeze what they accept
            lo, hi = s + frozen[b] - done, min(s + n, limit) - done
            y_next[w, s - done:lo] = seq[s:s + frozen[b]]
            if lo < hi:
                frozen[b] += accept(outputs[w][lo:hi], drafted[w][lo:hi])[0]
        seq[done:end] = y_next[w]
        stats.accepted.append(accepted)
        if pool_size and accepted < a:  # a rejection: recycle the window and the rejected tail
            pool.append(seq[starts[0]:end].tolist())
            pool.append(outputs[w][accepted:a])
        done += accepted
        if pool_size > 1:
            cache.copy_row(w, cached, done - 1)  # every row's committed slots are the winner's
        cached = done - 1
        if done == active_end and done < limit and not stop:
            if len(starts) > 1:  # promote the next block: its tokens are a draft from now on
                starts, frozen = starts[1:], frozen[1:]
            else:  # nothing to promote: a fresh block, as plain Jacobi starts one
                starts = [done]
                seq[done:min(done + n, limit)] = initial_guess(seq[:done], min(n, limit - done), guess,
                                                               generator)
        newest = frozen[-1] if frozen else done - starts[0]
        if len(starts) < K and newest >= spawn_at and starts[-1] + n < limit:  # spawn a block
            s, e = starts[-1] + n, min(starts[-1] + 2 * n, limit)
            draft = torch.cat([seq[done:min(starts[0] + n, limit)],
                               initial_guess(seq[:done], e - s, guess, generator)])
            seq[s:e] = draft[:e - s]
            starts.append(s)
            frozen.append(0)
    stats.forwards = len(stats.accepted)
    return seq[P:done], stats
