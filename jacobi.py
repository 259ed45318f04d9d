"""
Greedy autoregressive decoding and Jacobi decoding, with the KV cache of model.py.

Jacobi decoding (CLLM paper, section 3.1) guesses a block of n future tokens y = (y_1 .. y_n) and
refines all of them in one forward pass per iteration:

    y_i^(j+1) = argmax p( . | x, y_<i^(j) )      for i = 1..n at once          (Jacobi update)

until y^(j+1) == y^(j): the fixed point y*, which is exactly what greedy decoding would produce.
y_1 is right after the first pass (its context x is final) and every pass makes at least one more
token right, so a block converges in at most n passes. After a pass, the longest prefix of the block
whose inputs were already right is final: it is committed and never run again (fast-forward).

Read jacobi_decode_reference first: the paper's loop with no cache, re-running the whole sequence
each iteration. jacobi_decode is the same loop with the KV cache; the tests check that it gives the
same tokens and the same trajectory as the reference, and the same tokens as greedy_decode.

Call model.eval() first. Batch size 1: per-row acceptance would make a batch ragged.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class BlockTrajectory:
    """One block of Jacobi decoding: the training data of a CLLM (train_cllm.py)."""
    prefix: torch.Tensor  # (P,) prompt plus every earlier block's fixed point
    states: torch.Tensor  # (S, n) y^(0), y^(1), .., y*; each differs from the one before it

    @property
    def fixed_point(self):
        return self.states[-1]


@dataclass
class JacobiStats:
    forwards: int = 0                                 # decoder forward passes, prefill included
    iterations: list = field(default_factory=list)    # forward passes per block
    accepted: list = field(default_factory=list)      # tokens committed by each forward pass
    fast_forwarded: int = 0   # tokens committed beyond the one a pass always gets right
                              # (stationary tokens are among them once they are committed)
    stationary: int = 0       # tokens already at their fixed-point value (and staying there)
                              # while a token before them was still wrong
    trajectory: list = None   # [BlockTrajectory] when asked for

    @property
    def tokens(self):
        return sum(self.accepted)

    @property
    def tokens_per_forward(self):
        return self.tokens / self.forwards if self.forwards else 0.0


# ----------------------------------------------------------------------------------------------
# shared pieces

def check_inputs(model, idx, max_new_tokens, n=1):
    """Validate the arguments of a decoder; return the prompt (P,) and how many tokens fit."""
    if idx.dim() == 2:
        if idx.size(0) != 1:
            raise ValueError(f"decoding takes one prompt (batch size 1), got a batch of {idx.size(0)}")
        idx = idx[0]
    if idx.dim() != 1 or idx.dtype != torch.long:
        raise ValueError(f"the prompt must be a 1-D LongTensor of token ids, got {tuple(idx.shape)} "
                         f"{idx.dtype}")
    P, cfg = idx.numel(), model.config
    if P == 0:
        raise ValueError("the prompt is empty: give at least one token to condition on "
                         "(an empty text can be encoded as the end-of-text token)")
    if P > cfg.block_size:
        raise ValueError(f"the prompt has {P} tokens but the model's context is {cfg.block_size}: "
                         f"keep its last tokens, e.g. idx[-{cfg.block_size // 2}:]")
    if idx.min() < 0 or idx.max() >= cfg.vocab_size:
        raise ValueError(f"the prompt has token ids outside the vocabulary [0, {cfg.vocab_size})")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the block size n must be an integer >= 1, got {n!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if model.training and cfg.dropout > 0:
        raise ValueError("the model is in training mode with dropout: call model.eval() first")
    # a sequence never grows past the context: generation stops cleanly at the limit
    return idx, min(max_new_tokens, cfg.block_size - P)


def initial_guess(prefix, n, init, generator):
    """y^(0), the first guess for a block of n tokens.

    "prefix": n tokens drawn uniformly, with replacement, from the prefix (the paper's choice;
    use the same one in trajectory collection, training and inference). "repeat": the last token
    n times.
    """
    if init == "prefix":
        picks = torch.randint(len(prefix), (n,), generator=generator).to(prefix.device)
        return prefix[picks]
    if init == "repeat":
        return prefix[-1:].repeat(n)
    raise ValueError(f"unknown init {init!r}: use 'prefix' or 'repeat'")


def leading_true(mask):
    """Length of the run of True at the start of a 1-D bool tensor."""
    return int(mask.long().cumprod(0).sum())


def count_stationary(states):
    """Tokens that reached their fixed-point value, and kept it, while a token before them was
    still wrong (the paper's stationary tokens, section 3.3). states: (S, n), last row y*."""
    right = states == states[-1]                            # (S, n)
    stays = right.flip(0).long().cumprod(0).flip(0).bool()  # right from this state on
    settled = stays.long().argmax(0)                        # (n,) first state of the final run
    right_prefix = right.long().cumprod(1).sum(1)           # (S,) leading right tokens per state
    return int((right_prefix[settled] < torch.arange(states.size(1))).sum())


def _drop_repeats(states):
    """Remove states equal to the one before them (a truncated block can repeat a state)."""
    keep = [0] + [j for j in range(1, len(states)) if not torch.equal(states[j], states[j - 1])]
    return states[keep]


def block_trajectory(prefix, states, length):
    """The states of a block, cut to its first `length` tokens (a block cut at EOS)."""
    return BlockTrajectory(prefix.clone(), _drop_repeats(torch.stack(states)[:, :length]))


def eos_end(tokens, eos_id):
    """Index just past the first EOS in tokens, or None when there is none."""
    hits = (tokens == eos_id).nonzero() if eos_id is not None else []
    return int(hits[0]) + 1 if len(hits) else None


# ----------------------------------------------------------------------------------------------
# greedy autoregressive decoding: the baseline, one token per forward pass

@torch.no_grad()
def greedy_decode(model, idx, max_new_tokens, eos_id=None):
    """Greedy AR decoding with the KV cache. Returns the new tokens (N,), EOS included."""
    prompt, budget = check_inputs(model, idx, max_new_tokens)
    P, device = len(prompt), prompt.device
    out = []
    if budget == 0:
        return prompt.new_empty(0)
    cache = model.make_cache()
    logits, _ = model(prompt[None], input_pos=torch.arange(P, device=device), cache=cache)  # prefill
    while True:
        token = logits[0, -1].argmax()  # y_i = argmax p(. | x, y_<i)
        out.append(token)
        if len(out) == budget or token.item() == eos_id:
            return torch.stack(out)
        pos = torch.tensor([P + len(out) - 1], device=device)
        logits, _ = model(token.view(1, 1), input_pos=pos, cache=cache)


# ----------------------------------------------------------------------------------------------
# Jacobi decoding

@torch.no_grad()
def jacobi_decode_reference(model, idx, max_new_tokens, n=16, eos_id=None, init="prefix", seed=0):
    """The paper's loop, no cache: every iteration runs the whole sequence again.

    Slow and obviously correct; the oracle of the tests. Returns (new tokens, [BlockTrajectory]).
    """
    prompt, budget = check_inputs(model, idx, max_new_tokens, n)
    generator = torch.Generator().manual_seed(seed)
    seq, trajectory = prompt, []
    while len(seq) - len(prompt) < budget:
        b = min(n, budget - (len(seq) - len(prompt)))
        y = initial_guess(seq, b, init, generator)
        states = [y]
        for _ in range(b + 1):  # b passes to converge at the latest, one more to see it
            logits, _ = model(torch.cat([seq, y[:-1]])[None])
            y_next = logits[0, len(seq) - 1:].argmax(-1)  # the Jacobi update, all b tokens at once
            if torch.equal(y_next, y):
                break  # y^(j+1) == y^(j): the fixed point y*
            y = y_next
            states.append(y)
        else:
            raise AssertionError("a Jacobi block did not converge in n + 1 iterations")
        stop = eos_end(y, eos_id)
        trajectory.append(block_trajectory(seq, states, stop or b))
        seq = torch.cat([seq, y[:stop]])
        if stop:
            break
    return seq[len(prompt):], trajectory


@torch.no_grad()
def jacobi_decode(model, idx, max_new_tokens, n=16, eos_id=None, init="prefix", seed=0,
                  return_trajectory=False):
    """Jacobi decoding in blocks of n tokens, with the KV cache and fast-forward.

    Returns (new tokens (N,), JacobiStats). The tokens equal greedy_decode's (in float32).
    seed makes the initial guesses reproducible. return_trajectory keeps every block's states.
    """
    prompt, budget = check_inputs(model, idx, max_new_tokens, n)
    generator = torch.Generator().manual_seed(seed)
    P, device = len(prompt), prompt.device
    stats = JacobiStats(trajectory=[] if return_trajectory else None)
    seq = torch.cat([prompt, prompt.new_zeros(budget)])  # prompt, then the tokens to come
    cache = model.make_cache()
    done = P     # seq[:done] is final: the prompt and every committed token
    cached = 0   # cache slots [0, cached) hold final keys/values (the prompt is not in yet)
    while done < P + budget:
        start, end = done, min(done + n, P + budget)  # this block is seq[start:end]
        seq[start:end] = initial_guess(seq[:start], end - start, init, generator)
        states, forwards = [seq[start:end].clone()], 0
        while done < end:
            # One Jacobi iteration over the unconverged part of the block. Inputs: the final
            # tokens not yet in the cache (the whole prompt on the first pass, else just the last
            # one) and the guesses; the logit at position i predicts the token at i + 1.
            pos = torch.arange(cached, end - 1, device=device)
            logits, _ = model(seq[cached:end - 1][None], input_pos=pos, cache=cache)
            y_next = logits[0, done - 1 - cached:].argmax(-1)  # (end - done,) for seq[done:end]
            # y_next[0] is right (its inputs were final); y_next[i + 1] is right if the guess at i
            # was right, i.e. the input did not change: commit that run (fast-forward).
            accepted = 1 + leading_true(y_next[:-1] == seq[done:end - 1])
            seq[done:end] = y_next
            if not torch.equal(seq[start:end], states[-1]):
                states.append(seq[start:end].clone())
            forwards += 1
            stop = eos_end(seq[done:done + accepted], eos_id)
            accepted = stop or accepted  # nothing after an EOS is kept
            stats.accepted.append(accepted)
            done += accepted
            cached = done - 1  # keys/values up to the last final token's predecessor are final
            if stop:
                break
        block = block_trajectory(seq[:start], states, done - start)
        stats.forwards += forwards
        stats.iterations.append(forwards)
        stats.stationary += count_stationary(block.states)
        if return_trajectory:
            stats.trajectory.append(block)
        if stop:
            break
    stats.fast_forwarded = stats.tokens - stats.forwards
    return seq[P:done], stats
