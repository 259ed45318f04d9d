"""
Greedy autoregressive decoding and Jacobi decoding, with the KV cache of model.py.

Jacobi decoding (CLLM paper, section 3.1) guesses a block of n future tokens y = (y_1 .. y_n) and
refines all of them in one forward pass per iteration:

    y_i^(j+1) = argmax p( . | x, y_<i^(j) )      for i = 1..n at once          (Jacobi update)

until y^(j+1) == y^(j): the fixed point y*, which is what greedy decoding would produce (exactly,
in exact arithmetic; in float32 too unless two logits nearly tie, README "Exactness").
y_1 is right after the first pass (its context x is final) and every pass makes at least one more
token right, so a block converges in at most n passes (and one more pass sees that it has).

Read jacobi_decode_reference first: the paper's loop with no cache, re-running the whole sequence
each iteration. jacobi_decode is the same loop with the KV cache and fast-forward; the tests check
that it gives the same tokens and the same trajectory as the reference, and the same tokens as
greedy_decode. collect_trajectories runs the same loop for many prompts at once: the training data
of a CLLM (train_cllm.py). extras/decoders.py has the decoders that go past the paper's loop.

Call model.eval() first. Batch size 1 (but for collection): per-row acceptance makes batches ragged.
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
    """What jacobi_decode did. The loop records only what it has at hand (host-side counts and the
    state after each pass); the derived numbers are computed when read, after decoding, so that
    none of them costs time (or a device sync) inside a timed region."""
    forwards: int = 0                                 # decoder forward passes
    iterations: list = field(default_factory=list)    # forward passes per block
    accepted: list = field(default_factory=list)      # tokens committed by each forward pass
    passes: list = field(default_factory=list)        # per block: (start, [y^(0), state after
                                                      # each pass], committed length)
    seq: torch.Tensor = None                          # prompt + output: the blocks' prefixes

    @property
    def tokens(self):
        return sum(self.accepted)

    @property
    def tokens_per_forward(self):
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def fast_forwarded(self):
        """Tokens committed beyond the one a pass always gets right."""
        return self.tokens - self.forwards

    @property
    def trajectory(self):
        """[BlockTrajectory]: every block's distinct states, cut where the block ended (EOS)."""
        return [BlockTrajectory(self.seq[:start].clone(), distinct(torch.stack(states)[:, :length]))
                for start, states, length in self.passes]

    @property
    def stationary(self):
        """Tokens that were stationary in some state (see stationary_tokens), over all blocks
        (0 for a decoder that records no blocks)."""
        return sum(int(stationary_tokens(b.states).any(0).sum()) for b in self.trajectory)


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
    if idx.device != model.lm_head.weight.device:
        raise ValueError(f"the prompt is on {idx.device} but the model on {model.lm_head.weight.device}: "
                         "move the prompt there (idx.to(device))")
    if P == 0:
        raise ValueError("the prompt is empty: give at least one token to condition on "
                         "(an empty text can be encoded as the end-of-text token)")
    if P > cfg.block_size:
        raise ValueError(f"the prompt has {P} tokens but the model's context is {cfg.block_size}: "
                         f"keep its last tokens, e.g. idx[-{cfg.block_size // 2}:]")
    low, high = torch.stack([idx.min(), idx.max()]).tolist()  # one device read
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(f"the prompt has token ids outside the vocabulary [0, {cfg.vocab_size})")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the block size n must be an integer >= 1, got {n!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if model.training and cfg.dropout > 0:
        raise ValueError("the model is in training mode with dropout: call model.eval() first")
    # a sequence never grows past the context: generation stops cleanly at the limit
    return idx, min(max_new_tokens, cfg.block_size - P)


def initial_guess(prefix, n, guess, generator):
    """y^(0), the first guess for a block of n tokens.

    "prefix": n tokens drawn uniformly, with replacement, from the prefix (the paper's choice;
    use the same one in trajectory collection, training and inference). "repeat": the last token
    n times. The generator lives on the prefix's device (see seeded), so drawing costs no sync.
    """
    if guess == "prefix":
        picks = torch.randint(len(prefix), (n,), generator=generator, device=prefix.device)
        return prefix[picks]
    if guess == "repeat":
        return prefix[-1:].repeat(n)
    raise ValueError(f"unknown guess {guess!r}: use 'prefix' or 'repeat'")


def seeded(seed, device):
    """A random generator on the device the guesses are drawn on. A seed gives the same guesses
    on every run on one kind of device; a GPU's generator draws other numbers than a CPU's."""
    return torch.Generator(device=device).manual_seed(seed)


def accept(y_next, guess, eos_id=None):
    """The acceptance rule of a pass over guessed tokens: (how many of y_next to commit, whether
    they end with EOS). y_next, guess: lists of token ids.

    guess were the inputs after the last final token and y_next the argmax outputs at the same
    positions. y_next[0] is right (all its inputs were final); y_next[i + 1] is right if guess[i]
    was, i.e. if y_next[i] == guess[i]: commit that leading run (fast-forward), and nothing
    after an EOS. The last guess is never an input, so it is never compared.
    """
    accepted = 1
    while accepted < len(y_next) and y_next[accepted - 1] == guess[accepted - 1]:
        accepted += 1
    if eos_id in y_next[:accepted]:
        return y_next.index(eos_id) + 1, True
    return accepted, False


def stationary_tokens(states):
    """(S, n) bool: which tokens of each state are stationary (paper section 3.3): right (equal to
    the fixed point, states[-1]) and staying right in every later state, while a token before
    them in that state is still wrong. The one definition, for the statistics and for --show.

        y(0)  9 2 9 4        token 1 (2) and token 3 (4) are right behind a wrong token 0
        y(1)  1 2 7 4        token 3 still right behind a wrong token 2
        y(2)  1 2 3 4        y*: nothing wrong, nothing stationary
        -> [[F T F T], [F F F T], [F F F F]]: two tokens were stationary at some point
    """
    right = states == states[-1]                                # (S, n)
    stays = right.flip(0).long().cumprod(0).flip(0).bool()      # right from this state on
    right_prefix = right.long().cumprod(1).sum(1, keepdim=True)  # (S, 1) leading right tokens
    return stays & (torch.arange(states.size(1), device=states.device) >= right_prefix)


def eos_end(tokens, eos_id):
    """Index just past the first EOS in tokens, or None when there is none."""
    hits = (tokens == eos_id).nonzero() if eos_id is not None else []
    return int(hits[0]) + 1 if len(hits) else None


def longest_run(tokens):
    """Length of the longest run of one token repeated: a generation that repeats itself."""
    best = run = 1 if len(tokens) else 0
    for a, b in zip(tokens, tokens[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best


def distinct(states):
    """The rows of states (S, n) that differ from the row before them (a pass can leave a block
    unchanged: the confirming pass, or changes after an EOS that the block is cut at)."""
    keep = [0] + [j for j in range(1, len(states)) if not torch.equal(states[j], states[j - 1])]
    return states[keep]


# ----------------------------------------------------------------------------------------------
# greedy autoregressive decoding: the baseline, one token per forward pass

@torch.no_grad()
def greedy_decode(model, idx, max_new_tokens, eos_id=None):
    """Greedy AR decoding with the KV cache. Returns the new tokens (N,), EOS included.
    One read from the device per token (is it EOS?), none without an eos_id."""
    prompt, budget = check_inputs(model, idx, max_new_tokens)
    P, out = len(prompt), []
    if budget == 0:
        return prompt.new_empty(0)
    cache = model.make_cache()
    logits, _ = model(prompt[None], input_pos=range(P), cache=cache)  # prefill
    while True:
        token = logits[0, -1].argmax()  # y_i = argmax p(. | x, y_<i)
        out.append(token)
        if len(out) == budget or (eos_id is not None and token.item() == eos_id):
            return torch.stack(out)
        pos = P + len(out) - 1
        logits, _ = model(token.view(1, 1), input_pos=range(pos, pos + 1), cache=cache)


# ----------------------------------------------------------------------------------------------
# Jacobi decoding

@torch.no_grad()
def jacobi_decode_reference(model, idx, max_new_tokens, n=16, eos_id=None, guess="prefix", seed=0):
    """The paper's loop, no cache: every iteration runs the whole sequence again.

    Slow and obviously correct; the oracle of the tests. Returns (new tokens, [BlockTrajectory]).
    """
    prompt, budget = check_inputs(model, idx, max_new_tokens, n)
    generator = seeded(seed, prompt.device)
    seq, trajectory = prompt, []
    while len(seq) - len(prompt) < budget:
        b = min(n, budget - (len(seq) - len(prompt)))
        y = initial_guess(seq, b, guess, generator)
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
        stop = eos_end(y, eos_id)  # the block ends at its first EOS
        trajectory.append(BlockTrajectory(seq, distinct(torch.stack(states)[:, :stop or b])))
        seq = torch.cat([seq, y[:stop]])
        if stop:
            break
    return seq[len(prompt):], trajectory


@torch.no_grad()
def jacobi_decode(model, idx, max_new_tokens, n=16, eos_id=None, guess="prefix", seed=0):
    """Jacobi decoding in blocks of n tokens, with the KV cache and fast-forward.

    Returns (new tokens (N,), JacobiStats). The tokens equal greedy_decode's (in float32, barring a
    near-tie that a block forward and a one-token forward round apart).
    seed makes the initial guesses reproducible.

    The index arithmetic, on a 3-token prompt x0 x1 x2 and a block of n = 5 (start = 3, end = 8):
      seq[:done] is final; cache slots [0, cached) hold keys/values computed from final tokens.
      pass 1: done = 3, cached = 0. Inputs seq[0:7] = x0 x1 x2 g0 g1 g2 g3 at positions 0..6 (the
              prompt goes in with the first pass: no separate prefill); g4 is not an input, no
              position of the block comes after it. The logits at positions 2..6 predict seq[3:8].
              Say they give a b c' d' e' with a != g0: accepted = 1. done = 4, cached = 3: slot 3
              holds the keys of g0, the guess that was at position 3, not of a, so it is scratch.
      pass 2: inputs seq[3:7] = a b c' d' at positions 3..6 (slot 3 is recomputed, now from a).
              Outputs at 3..6 predict seq[4:8]: b c d e'. b == b and c != c': accepted = 2
              (b, whose input a was final, and c, whose inputs a b were final). done = 6, cached = 5.
      pass 3: inputs seq[5:7] = c d at positions 5, 6; they predict seq[6:8] = d e. d == d, so both
              are right: accepted = 2, done = 8 = end. The block took 3 passes for 5 tokens.
    cached = done - 1 always: the last committed token's keys and values were computed from the
    guess that stood at its position, so the next pass runs it again.
    """
    prompt, budget = check_inputs(model, idx, max_new_tokens, n)
    generator = seeded(seed, prompt.device)
    P = len(prompt)
    seq = torch.cat([prompt, prompt.new_zeros(budget)])  # prompt, then the tokens to come
    stats = JacobiStats(seq=seq)
    cache = model.make_cache()
    done = P     # seq[:done] is final: the prompt and every committed token
    cached = 0   # cache slots [0, cached) hold final keys/values (the prompt is not in yet)
    stop = False
    while done < P + budget and not stop:
        start, end = done, min(done + n, P + budget)  # this block is seq[start:end]
        seq[start:end] = initial_guess(seq[:start], end - start, guess, generator)
        states = [seq[start:end].clone()]
        while done < end and not stop:
            # One Jacobi iteration over the unconverged part of the block. Inputs: the final
            # tokens not yet in the cache (the whole prompt on the first pass, else just the last
            # one) and the guesses; the logit at position i predicts the token at i + 1.
            logits, _ = model(seq[cached:end - 1][None], input_pos=range(cached, end - 1), cache=cache)
            y_next = logits[0, done - 1 - cached:].argmax(-1)  # (end - done,) for seq[done:end]
            outputs, drafted = torch.stack([y_next, seq[done:end]]).tolist()  # the pass's one device read
            accepted, stop = accept(outputs, drafted, eos_id)
            seq[done:end] = y_next
            states.append(seq[start:end].clone())
            stats.accepted.append(accepted)
            done += accepted
            cached = done - 1  # see the docstring: the last committed token is run again
        stats.iterations.append(len(states) - 1)
        stats.passes.append((start, states, done - start))
    stats.forwards = sum(stats.iterations)
    return seq[P:done], stats


# ----------------------------------------------------------------------------------------------
# Jacobi trajectories of many prompts at once: the training data of a CLLM

@torch.no_grad()
def collect_trajectories(model, prompts, n, max_new_tokens, eos_id=None, guess="prefix", seeds=None,
                         repeat_limit=0):
    """Jacobi-decode many prompts side by side; return, per prompt, its [BlockTrajectory], or
    None where the output repeats one token repeat_limit times in a row (repeat_limit > 0): such
    a prompt is dropped, it teaches collapse (the authors drop such a block, not the prompt).

    The same states as jacobi_decode(model, prompt, ..., seed=seeds[i]).trajectory, computed for
    a whole batch at once: every row sits at its own positions in one KV cache (input_pos
    (B, T)), and each iteration re-runs every row's whole block, so that rows that converged
    early keep final keys and values (the same values as before) while the others go on.
    """
    device, context = next(model.parameters()).device, model.config.block_size
    seeds = seeds if seeds is not None else [0] * len(prompts)
    generators = [seeded(s, device) for s in seeds]
    seqs = [p.to(device) for p in prompts]
    budgets = [min(max_new_tokens, context - len(p)) for p in prompts]
    trajectories = [[] for _ in prompts]
    active = [i for i in range(len(prompts)) if budgets[i] > 0]
    cache = model.make_cache(batch_size=len(active))
    # prefill all but each prompt's last token, right-padded (pad slots are overwritten later)
    width = max((len(seqs[i]) - 1 for i in active), default=0)
    if width > 0:
        rows = [torch.cat([seqs[i][:-1], seqs[i].new_zeros(width - len(seqs[i]) + 1)]) for i in active]
        model(torch.stack(rows), input_pos=range(width), cache=cache)
    while active:
        starts = [len(seqs[i]) for i in active]
        sizes = [min(n, len(prompts[i]) + budgets[i] - len(seqs[i])) for i in active]
        y = torch.zeros(len(active), n, dtype=torch.long, device=device)
        for r, i in enumerate(active):
            y[r, :sizes[r]] = initial_guess(seqs[i], sizes[r], guess, generators[i])
        last = torch.stack([seqs[i][-1] for i in active])
        # inputs: the last final token, then the guesses; a row's padding sits at later positions
        pos = torch.stack([torch.arange(s - 1, s - 1 + n) for s in starts]).clamp(max=context - 1)
        valid = torch.arange(n)[None, :] < torch.tensor(sizes)[:, None]  # (A, n)
        valid, pos = valid.to(device), pos.to(device)
        states = [[y[r, :sizes[r]].clone()] for r in range(len(active))]
        converged = torch.zeros(len(active), dtype=torch.bool, device=device)
        for _ in range(n + 1):  # n passes to converge at the latest, one more to see it
            x = torch.cat([last[:, None], y[:, :-1]], dim=1)  # (A, n)
            logits, _ = model(x, input_pos=pos, cache=cache)
            y_next = logits.argmax(-1)  # (A, n): the Jacobi update of every row at once
            changed = ((y_next != y) & valid).any(1) & ~converged
            converged |= ~changed
            y = torch.where(changed[:, None], y_next, y)
            for r in changed.nonzero().flatten().tolist():
                states[r].append(y[r, :sizes[r]].clone())
            if converged.all():
                break
        assert converged.all(), "a Jacobi block did not converge in n + 1 iterations"
        keep = []
        for r, i in enumerate(active):
            fixed = y[r, :sizes[r]]
            end = eos_end(fixed, eos_id)  # the block ends at its first EOS
            block = torch.stack(states[r])[:, :end or sizes[r]]
            trajectories[i].append(BlockTrajectory(seqs[i].clone(), distinct(block)))
            seqs[i] = torch.cat([seqs[i], fixed[:end]])
            if not end and len(seqs[i]) < len(prompts[i]) + budgets[i]:
                keep.append(r)
        active = [active[r] for r in keep]
        if len(keep) < len(converged):
            cache.keep_rows(torch.tensor(keep, dtype=torch.long, device=device))
    if repeat_limit:  # the outputs (the blocks' fixed points) that repeat a token: dropped
        trajectories = [None if t and longest_run(torch.cat([b.fixed_point for b in t]).tolist()) >= repeat_limit
                        else t for t in trajectories]
    return trajectories
