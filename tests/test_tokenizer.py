# Tests of tokenizer.py: our BPE ranks used through tiktoken round-trip any text exactly.
# Run: python -m pytest -q tests/test_tokenizer.py
import pytest

from data.tokenizer import EOT, load_ranks, load_tokenizer, make_encoding, save_ranks, train_bpe

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


def test_errors():
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe("abc", 100)
    with pytest.raises(FileNotFoundError, match="prepare the dataset"):
        load_tokenizer("/nonexistent/tokenizer.tiktoken")
