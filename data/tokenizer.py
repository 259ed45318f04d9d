"""
A byte-level BPE tokenizer trained on a dataset's own text, used through tiktoken.

tiktoken.get_encoding("gpt2") downloads its vocabulary, so it cannot be the offline default.
Instead each dataset trains its own merges (train_bpe), saves the ranks in tiktoken's file format
(one `base64(token bytes) rank` line per token) and builds a tiktoken.Encoding from them, with an
end-of-text special token as the last id. Encoding and decoding then run in tiktoken's fast code.

The split pattern is GPT-2's, except that numbers are split into single digits: a model that
sees 3 7 + 1 4 digit by digit learns arithmetic far more easily than one that sees 37 and 14 as
unrelated tokens, while whole words still become single tokens, which lets a CLLM skip template
text in few tokens.
"""

import base64
import heapq
import os
from collections import Counter, defaultdict

import regex
import tiktoken

EOT = "<|endoftext|>"
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_bpe(texts, vocab_size, pattern=SPLIT_PATTERN):
    """Learn byte-pair merges on a text (or a list of texts); return tiktoken ranks {bytes: id}.

    vocab_size counts the 256 single bytes, the merges and the end-of-text token. Words (the
    chunks of the split pattern) are counted once; the most frequent adjacent pair is merged
    again and again, with pair counts updated only in the words that contain the merged pair.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + end-of-text), got {vocab_size}")
    texts = [texts] if isinstance(texts, str) else texts
    counts = Counter(chunk for text in texts for chunk in regex.findall(pattern, text))
    words = [list(w.encode("utf-8")) for w in counts]
    freqs = list(counts.values())
    token_bytes = [bytes([i]) for i in range(256)]
    ranks = {b: i for i, b in enumerate(token_bytes)}
    pair_counts, where = Counter(), defaultdict(set)
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[wi]
            where[pair].add(wi)
    heap = [(-c, p) for p, c in pair_counts.items()]  # ties broken by the pair: deterministic
    heapq.heapify(heap)
    while len(ranks) < vocab_size - 1 and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or -neg < 2:
            continue  # a stale heap entry (the count changed since), or nothing worth merging
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged not in ranks:  # two merge paths can spell the same bytes: keep one id
            ranks[merged] = len(token_bytes)
            token_bytes.append(merged)
        new_id = ranks[merged]
        changed = set()
        for wi in where.pop(pair):
            w, f = words[wi], freqs[wi]
            if len(w) < 2:
                continue
            for p in zip(w, w[1:]):
                pair_counts[p] -= f
                changed.add(p)
            i, out = 0, []
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for p in zip(out, out[1:]):
                pair_counts[p] += f
                where[p].add(wi)
                changed.add(p)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                pair_counts.pop(p)
    return ranks


def save_ranks(ranks, path):
    """tiktoken's own file format: base64 of the token's bytes, a space, its rank."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for b, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(b).decode()} {rank}\n")
    os.replace(tmp, path)


def load_ranks(path):
    with open(path) as f:
        return {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in f if ln.strip())}


def make_encoding(ranks, pattern=SPLIT_PATTERN, name="cllm"):
    """A tiktoken.Encoding from our ranks; the end-of-text token takes the next id."""
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def load_tokenizer(path, pattern=SPLIT_PATTERN):
    """The encoding saved at path; "gpt2" for GPT-2's own (downloaded by tiktoken: internet)."""
    if path == "gpt2":
        return tiktoken.get_encoding("gpt2")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path} not found: prepare the dataset first "
                                "(python data/<name>/prepare.py)")
    return make_encoding(load_ranks(path), pattern)
