"""
A prepared dataset: the folder data/<name>/ that a prepare.py writes and the training scripts read.

    tokenizer.tiktoken        BPE ranks trained on the training text (tiktoken's file format);
                              none when the dataset uses GPT-2's tokenizer (split_pattern "gpt2")
    train.bin, val.bin        uint16 token streams for pretraining: prompt + answer + EOT, repeated
                              (plus any other documents of the split, each ending with EOT)
    train/val/test.jsonl      {"prompt": ..., "answer": ...} records; test = the held-out prompts
                              every speed and quality number is measured on
    meta.json                 sizes, vocabulary, split pattern, quality measure, source, settings

Records are split by a hash of the prompt, so a prompt (and every copy of it) lands in one split
only and the split is stable from run to run.
"""

import ast
import hashlib
import importlib
import json
import os
import re
import time

import numpy as np

from data.tokenizer import SPLIT_PATTERN, load_tokenizer, make_encoding, save_ranks, train_bpe

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
SPLITS = ("train", "val", "test")


def dataset_dir(name):
    """data/<name>, or name itself when it is a path to a folder."""
    return name if os.sep in name else os.path.join(DATA_DIR, name)


def split_of(key, val_frac, test_frac):
    """'train', 'val' or 'test' for a record, from a hash of its key (stable, no leakage)."""
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 16 ** 8
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def is_prepared(name, settings):
    """True when data/<name> was prepared with exactly these settings (prepare is idempotent)."""
    path = os.path.join(dataset_dir(name), "meta.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("settings") == settings


def _write_atomic(path, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def write_dataset(name, records, vocab_size, metric, source, settings, pattern=SPLIT_PATTERN,
                  extra_text=None, gpt2_tokenizer=False):
    """Train the tokenizer on the training text, then write everything listed above.

    records: {split: [{"prompt": str, "answer": str}]}; metric: see score, or "loss".
    extra_text: {split: [str]}, more documents for the train/val streams (each ends with EOT).
    gpt2_tokenizer: use GPT-2's own tokenizer instead (for GPT-2 weights; tiktoken downloads it).
    """
    extra_text = extra_text or {}
    t0 = time.time()
    out = dataset_dir(name)
    os.makedirs(out, exist_ok=True)
    if gpt2_tokenizer:
        enc, pattern = load_tokenizer("gpt2"), "gpt2"
    else:
        train_texts = [r[k] for r in records["train"] for k in ("prompt", "answer")]
        ranks = train_bpe(train_texts + extra_text.get("train", []), vocab_size, pattern)
        _write_atomic(os.path.join(out, "tokenizer.tiktoken"), lambda p: save_ranks(ranks, p))
        enc = make_encoding(ranks, pattern)
    tokens, encoded = {}, {}
    for split in SPLITS:
        _write_atomic(os.path.join(out, f"{split}.jsonl"), lambda p: _write_jsonl(p, records[split]))
        # prompt and answer are encoded apart, as they are at generation time: a token never
        # straddles the point where the model starts to answer
        prompts = encode_all(enc, [r["prompt"] for r in records[split]])
        answers = encode_all(enc, [r["answer"] for r in records[split]])
        encoded[split] = prompts, answers
        docs = [p + a for p, a in zip(prompts, answers)] + encode_all(enc, extra_text.get(split, []))
        stream = np.array([t for doc in docs for t in [*doc, enc.eot_token]], dtype=np.uint16)
        tokens[split] = len(stream)
        if split != "test":
            _write_atomic(os.path.join(out, f"{split}.bin"), stream.tofile)
    answer_tokens = [len(a) for a in encoded["test"][1]]
    meta = dict(name=os.path.basename(out), vocab_size=enc.n_vocab, eot_id=enc.eot_token,
                split_pattern=pattern, metric=metric, source=source, settings=settings,
                records={s: len(records[s]) for s in SPLITS}, tokens=tokens,
                mean_answer_tokens=float(np.mean(answer_tokens)) if answer_tokens else 0.0,
                lengths=length_percentiles(*encoded["train"]), seconds=round(time.time() - t0, 1))
    _write_atomic(os.path.join(out, "meta.json"), lambda p: _write_json(p, meta))
    print(f"{meta['name']}: records {meta['records']}, tokens {tokens}, vocab {enc.n_vocab}, "
          f"mean answer {meta['mean_answer_tokens']:.1f} tokens, {meta['seconds']:.1f}s -> {out}")
    print("token lengths of the training records (50th/90th/95th percentile, max): " + "; ".join(
        f"{k} {v['p50']}/{v['p90']}/{v['p95']}/{v['max']}" for k, v in meta["lengths"].items()))
    return meta


def encode_all(enc, texts):
    """Token ids of each text. (A plain loop: tiktoken's encode_ordinary_batch hands every text to
    a thread pool, which costs more than encoding a short text, 3.4x the time on 100k records.)"""
    return [enc.encode_ordinary(t) for t in texts]


def length_percentiles(prompts, answers):
    """Token lengths of prompt, answer (+ EOS) and both, at the 50th/90th/95th percentile and max,
    from the records' token ids: what the context and the generation length should fit
    (context_length, generation_length)."""
    prompts, answers = [len(p) for p in prompts], [len(a) + 1 for a in answers]
    lengths = dict(prompt=prompts, answer=answers, total=[p + a for p, a in zip(prompts, answers)])
    return {k: dict(p50=int(np.percentile(v, 50)), p90=int(np.percentile(v, 90)),
                    p95=int(np.percentile(v, 95)), max=int(max(v))) for k, v in lengths.items() if v}


def context_length(meta, say=print):
    """The context of a model trained on this data when none is set: the 95th percentile of
    prompt + answer + EOS, rounded up to a multiple of 64, from 64 to 1024 (a CPU-sized choice;
    set --block_size for more)."""
    total = meta.get("lengths", {}).get("total")
    if total is None:
        say(f"note: {meta['name']} has no length statistics (prepared by an older version): context 128")
        return 128
    context = min(1024, max(64, -(-total["p95"] // 64) * 64))
    say(f"context {context} tokens: 95% of the training records (prompt + answer) fit in "
        f"{total['p95']}" + ("" if total["max"] <= context else
                             f"; the longest, {total['max']}, are cropped"))
    return context


def generation_length(meta, context):
    """max_new_tokens when none is set: the longest training answer with its EOS, but at most
    half the context (the prompt keeps the rest)."""
    answer = meta.get("lengths", {}).get("answer", {}).get("max", 96)
    return max(1, min(answer, context // 2))


def trajectory_length(meta, context, n):
    """Tokens decoded per training prompt of a CLLM: whole blocks of n that hold 95% of the data's
    answers, at most the generation length, so that a target whose outputs never end (a weak one)
    costs no more than one that ends them."""
    p95 = meta.get("lengths", {}).get("answer", {}).get("p95")
    full = generation_length(meta, context)
    return min(full, -(-p95 // n) * n) if p95 else full


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# ----------------------------------------------------------------------------------------------
# reading a prepared dataset

def ensure_prepared(name):
    """Prepare a dataset that ships its own prepare.py (arith, pycode) when it is missing, saying
    so; any other missing dataset is an error that says how to prepare it."""
    if not os.path.isfile(os.path.join(dataset_dir(name), "meta.json")) and name in ("arith", "pycode"):
        print(f"data/{name} is missing: preparing it (by hand: python data/{name}/prepare.py)")
        importlib.import_module(f"data.{name}.prepare").prepare([])
    return load_meta(name)


def load_meta(name):
    path = os.path.join(dataset_dir(name), "meta.json")
    if not os.path.isfile(path):
        how = (f"python data/{name}/prepare.py (or data/custom/prepare.py for your own data)"
               if os.sep not in name else f"the prepare.py that makes it, with --name={name}")
        raise FileNotFoundError(f"dataset {name!r} is not prepared ({path} missing): run {how}")
    with open(path) as f:
        return json.load(f)


def load_encoding(name):
    meta = load_meta(name)
    if meta["split_pattern"] == "gpt2":  # prepared with GPT-2's own tokenizer
        return load_tokenizer("gpt2")
    return load_tokenizer(dataset_file(name, "tokenizer.tiktoken"), meta["split_pattern"])


def dataset_file(name, file):
    """The path of one file of a prepared dataset, or an error that says how to remake it."""
    load_meta(name)
    path = os.path.join(dataset_dir(name), file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset {name!r} is incomplete: {path} is missing. Prepare it "
                                f"again (delete {dataset_dir(name)}/meta.json, then run its "
                                "prepare.py)")
    return path


def load_tokens(name, split):
    """The uint16 token stream of a split, memory-mapped."""
    return np.memmap(dataset_file(name, f"{split}.bin"), dtype=np.uint16, mode="r")


def load_records(name, split):
    with open(dataset_file(name, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------
# quality of a generation: the task's own measure

def final_answer(text):
    """The number after '####' in an arith solution, or None."""
    m = re.search(r"####\s*(-?\d+)", text)
    return int(m.group(1)) if m else None


def parses(prompt, completion):
    """Whether a generated function body parses as Python after its signature and docstring."""
    try:
        ast.parse(prompt + completion)
        return True
    except (SyntaxError, ValueError):
        return False


def score(metric, record, completion):
    """1.0 if a completion is right by the dataset's measure, else 0.0; None for 'loss'.
    accuracy: the number after '####' is the answer's; parse: the function body parses;
    exact: the completion is the answer, up to white space at its ends."""
    if metric == "exact":
        return float(completion.strip() == record["answer"].strip())
    if metric == "accuracy":
        got, want = final_answer(completion), final_answer(record["answer"])
        return float(got is not None and got == want)
    if metric == "parse":
        return float(parses(record["prompt"], completion))
    return None
