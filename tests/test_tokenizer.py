# Tests of data/tokenizer.py: train_bpe learns the merges a hand count gives, the same in every
# process; our ranks used through tiktoken compress text and round-trip any text exactly.
# Run: python -m pytest -q tests/test_tokenizer.py
import os
import random
import subprocess
import sys

import pytest

from data.tokenizer import EOT, load_ranks, load_tokenizer, make_encoding, save_ranks, train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_TEXT = ("Mia has 23 apples. She buys 14 more apples.\nMia has 23 + 14 = 37 apples.\n"
              "def add(a, b):\n    return a + b\n") * 50


@pytest.fixture(scope="module")
def enc():
    return make_encoding(train_bpe(TRAIN_TEXT, 400))


@pytest.mark.parametrize("text", [
    "", "0", "1234567890", TRAIN_TEXT, "héllo wörld ünïcode — “quotes”", "日本語のテキスト 🙂👍🏽",
    "\t\n  \r\n trailing   ", "x" * 1000, "\x00\x01 control bytes \x7f", "a<|endoftext|>b",
])
def test_round_trip_exact(enc, text):
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_round_trip_goes_through_the_merges(enc):
    """The round trip above holds for any merge table, even an empty one; here the text also
    comes back from far fewer tokens than bytes, many of them several bytes long."""
    for text in (TRAIN_TEXT, "She has 14 more apples. Mia buys 37 apples."):
        ids = enc.encode_ordinary(text)
        assert enc.decode(ids) == text
        assert len(ids) < len(text.encode()) / 2
    assert enc.encode_ordinary(" apples") == [enc.encode_single_token(b" apples")]


def test_merges_counted_by_hand():
    """Chunks "ab", " ab", " ab", " cd": the pair a b occurs 3 times, then (a b is one token)
    " " ab twice; every other pair once, too rare to merge. Ties go to the smaller pair of ids:
    in "xy xy zw zw" the pairs x y, " " z and z w occur twice each and " " z (32, 122) comes
    first; z w is gone after it, " z" w takes its place, after x y (120, 121)."""
    merges = lambda ranks: {b: r for b, r in ranks.items() if r >= 256}
    assert merges(train_bpe("ab ab ab cd", 300)) == {b"ab": 256, b" ab": 257}
    assert merges(train_bpe("xy xy zw zw", 300)) == {b" z": 256, b"xy": 257, b" zw": 258}
    assert merges(train_bpe("ab ab ab cd", 258)) == {b"ab": 256}  # vocab_size counts EOT


def test_digits_are_single_tokens_and_words_whole(enc):
    pieces = [enc.decode([t]) for t in enc.encode_ordinary("Mia has 2314 apples")]
    assert pieces == ["Mia", " has", " ", "2", "3", "1", "4", " apples"]


def test_end_of_text_is_the_last_id(enc):
    assert enc.eot_token == enc.n_vocab - 1 <= 399
    assert enc.encode(EOT, allowed_special="all") == [enc.eot_token]


def test_ranks_file_round_trip(tmp_path, enc):
    ranks = train_bpe(TRAIN_TEXT, 400)
    save_ranks(ranks, str(tmp_path / "tok.tiktoken"))
    assert load_ranks(str(tmp_path / "tok.tiktoken")) == ranks
    loaded = load_tokenizer(str(tmp_path / "tok.tiktoken"))
    assert loaded.encode_ordinary(TRAIN_TEXT) == enc.encode_ordinary(TRAIN_TEXT)


def test_training_is_deterministic_and_bounded():
    a, b = train_bpe(TRAIN_TEXT, 300), train_bpe(TRAIN_TEXT, 300)
    assert a == b and len(a) <= 299  # 256 bytes, at most 42 merges, the end-of-text token
    assert sorted(a.values()) == list(range(len(a)))  # ranks 0 .. len - 1, no gaps


RANKS_OF_A_FILE = """
import sys
from data.tokenizer import save_ranks, train_bpe
save_ranks(train_bpe(open(sys.argv[1], encoding="utf-8").read(), 700), sys.argv[2])
"""


def test_the_same_merges_in_every_process(tmp_path):
    """The shipped models need data/arith/prepare.py to rebuild their tokenizer exactly, in
    another process: two processes with other string hashes (PYTHONHASHSEED) write the same
    ranks, byte for byte, as this one, on a text where many pairs tie."""
    rng = random.Random(0)  # random syllables and spaces, made-up words: many pairs tie
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zé", "qu", "Ω", " "]
    text = "".join(rng.choice(syllables) for _ in range(6000)) + TRAIN_TEXT
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    files = []
    for seed in ("1", "2"):
        out = tmp_path / f"ranks{seed}.tiktoken"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", RANKS_OF_A_FILE, str(tmp_path / "text.txt"), str(out)],
                       cwd=ROOT, env=env, check=True, timeout=120)
        files.append(out.read_bytes())
    save_ranks(train_bpe(text, 700), str(tmp_path / "here.tiktoken"))
    assert files[0] == files[1] == (tmp_path / "here.tiktoken").read_bytes()
    assert len(files[0].splitlines()) == 699  # 256 bytes and 443 merges (EOT is not in the file)


def test_errors():
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe("abc", 100)
    with pytest.raises(FileNotFoundError, match="prepare the dataset"):
        load_tokenizer("/nonexistent/tokenizer.tiktoken")
