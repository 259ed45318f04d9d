"""
Extra (a learner may skip it): decoders past the paper's loop, each exactly greedy. Every one drafts future tokens, runs them
through the model in one forward pass with the KV cache, and commits the leading run that the
model's own argmax confirms, plus the one token a pass always gets right (jacobi.accept). So
their output is greedy_decode's, token for token; tests/test_decoders.py fuzzes that.

    prompt_lookup_decode          the draft is what followed the latest earlier occurrence of
                                  the last few tokens: training-free, the first thing to try
    sliding_window_jacobi_decode  Jacobi over a window of several blocks that slides on by
                                  every committed token: the tokens after the block being
                                  decoded are refined in the same passes

The sliding window is not Jacobi Forcing's multi-block decoding. Theirs keeps one active block,
the only one that commits; a second, "pseudo-active" block starts (from the active block's
remaining draft) only once the active block has ceil(0.85 n) accepted tokens, and its tokens are
verified again when it is promoted; rejected n-grams are recycled as extra batch rows. Here the
whole window of blocks * n tokens is refreshed every pass and the leading right run is committed
wherever it ends, across block borders, at once.

Both return (tokens, JacobiStats) like jacobi_decode, with forwards, accepted and seq filled in
(no blocks: no trajectory, no stationary tokens).
"""

import torch

from jacobi import JacobiStats, accept, check_inputs, initial_guess, seeded


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
    refined from an unconverged past: what Jacobi Forcing's noisy-stream training is for. Exactly
    greedy, like every decoder here (tests/test_decoders.py).
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
