# Edge cases of decoding where the answer is known in advance: EOS as the very first generated
# token, and EOS with guess="repeat" (the guess then repeats the prompt's last token, which can be
# EOS itself). jacobi_decode, jacobi_decode_reference and greedy_decode must agree, and agree with
# the count by hand.
# Run: python -m pytest -q tests/test_edges.py   (on a GPU too: add --device=cuda)
import pytest
import torch

from conftest import DEVICE, make_model, random_prompt
from jacobi import greedy_decode, jacobi_decode, jacobi_decode_reference


def constant_model(token):
    """A model whose greedy output is always `token`, whatever its input: the last LayerNorm puts
    out a constant vector along that token's embedding (the output layer is the embedding, tied)."""
    model = make_model(seed=13)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[token] * 100)
    return model


def decode_three_ways(model, prompt, max_new_tokens, n, eos_id, guess):
    """(greedy tokens, Jacobi tokens, Jacobi stats, reference tokens, reference trajectory), after
    checking that the three give the same tokens and the two Jacobi loops the same states."""
    greedy = greedy_decode(model, prompt, max_new_tokens, eos_id)
    tokens, stats = jacobi_decode(model, prompt, max_new_tokens, n, eos_id, guess)
    ref, trajectory = jacobi_decode_reference(model, prompt, max_new_tokens, n, eos_id, guess)
    assert tokens.tolist() == greedy.tolist() == ref.tolist()
    assert len(stats.trajectory) == len(trajectory)
    for block, ref_block in zip(stats.trajectory, trajectory):
        assert torch.equal(block.states, ref_block.states)
    return greedy, tokens, stats, ref, trajectory


@pytest.mark.parametrize("guess", ["prefix", "repeat"])
@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_eos_as_the_first_token_of_a_constant_model(n, guess):
    """A model that always says 3, with 3 as EOS: every decoder gives [3] and stops; Jacobi takes
    one forward pass, and its one block is cut to one token whose last state is 3. With
    guess="repeat" and a prompt that ends in 3, the guess is already all EOS."""
    model = constant_model(3)
    for prompt in ([1, 2, 4, 5], [1, 2, 3]):
        prompt = torch.tensor(prompt, device=DEVICE)
        greedy, tokens, stats, _, trajectory = decode_three_ways(model, prompt, 20, n, 3, guess)
        assert greedy.tolist() == [3]
        assert stats.forwards == 1 and stats.accepted == [1] and stats.iterations == [1]
        assert [b.fixed_point.tolist() for b in trajectory] == [[3]]


@pytest.mark.parametrize("n", [1, 16])
def test_eos_as_the_first_token_of_a_random_model(n):
    """EOS = the token greedy decoding emits first: every decoder stops after it, at once."""
    model = make_model(seed=12, scale=8.0)
    for seed in range(3):
        prompt = random_prompt(6, seed=seed)
        eos_id = int(greedy_decode(model, prompt, 1)[0])
        for guess in ("prefix", "repeat"):
            greedy, _, stats, _, _ = decode_three_ways(model, prompt, 30, n, eos_id, guess)
            assert greedy.tolist() == [eos_id] and stats.forwards == 1


@pytest.mark.parametrize("n", [4, 8])
def test_a_guess_of_eos_is_no_end(n):
    """guess="repeat" after a prompt ending in EOS (7) guesses EOS everywhere; the model says 3,
    never 7, so nothing ends: 20 tokens of 3. By hand, n = 8: block 1 (8 tokens) takes 2 passes
    (its guesses are wrong, then all right), blocks 2 and 3 (8 and 4 tokens) guess 3s, right at
    once: 1 pass each; n = 4: 2 passes, then 4 blocks of 1 pass."""
    model = constant_model(3)
    prompt = torch.tensor([1, 2, 7], device=DEVICE)
    greedy, _, stats, _, _ = decode_three_ways(model, prompt, 20, n, 7, "repeat")
    assert greedy.tolist() == [3] * 20
    assert stats.iterations == {8: [2, 1, 1], 4: [2, 1, 1, 1, 1]}[n]


@pytest.mark.parametrize("n", [1, 4, 16])
def test_eos_inside_a_block_with_the_repeat_guess(n):
    """EOS = a token greedy emits mid-output, guess="repeat": every decoder stops right after its
    first EOS, with greedy's tokens up to there."""
    model = make_model(seed=12, scale=8.0)
    for seed in range(3):
        prompt = random_prompt(5, seed=seed)
        free = greedy_decode(model, prompt, 24).tolist()
        eos_id = free[len(free) // 2]
        greedy, *_ = decode_three_ways(model, prompt, 24, n, eos_id, "repeat")
        assert greedy.tolist() == free[:free.index(eos_id) + 1]
