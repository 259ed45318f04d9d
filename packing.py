"""
Packing: many sequences that continue one first sequence, in one row of one forward pass.

Distillation runs, for every record, the first sequence (prompt y*_1 .. y*_K) and several others
that each continue a prefix of it (prefix + a state, prefix + its teacher). Instead of one
forward per sequence, the segments are laid out side by side in one row:

    row:        [p0 p1 p2 a b c] [d e] [f g]       segment 1 continues p0 p1 p2, segment 2 p0 p1
    positions:   0  1  2  3 4 5   3 4   2 3        each token at its place in its own sequence
    attention:  segment 0 causal; segment 1 sees columns 0..2 and itself causally; segment 2
                sees columns 0..1 and itself causally

so that every logit equals the one a separate forward of prefix + segment gives
(tests/test_cllm.py checks this). train_cllm.pack_row decides the segments; this file lays them
out and pads rows into a batch.
"""

from typing import NamedTuple

import torch


class PackedRow(NamedTuple):
    tokens: torch.Tensor     # (T,)
    positions: torch.Tensor  # (T,) the position each token has in its own sequence
    attn: torch.Tensor       # (T, T) bool, True where a query may attend to a key
    labels: torch.Tensor     # (T,) AR labels, -1 where none
    student: torch.Tensor    # (C,) columns whose logits are the students of the consistency loss
    teacher: torch.Tensor    # (C,) and the columns of their teachers


def pack(segments):
    """segments: [(tokens (L,), position of its first token, how many of the row's first columns
    it sees)], the first one (tokens, 0, 0). Returns tokens (T,), positions (T,), attn (T, T) and
    the first column of every segment (plus T at the end)."""
    first_col = [0]
    for seg, _, _ in segments:
        first_col.append(first_col[-1] + len(seg))
    T = first_col[-1]
    attn = torch.zeros(T, T, dtype=torch.bool)
    for (seg, _, sees), c in zip(segments, first_col):
        attn[c:c + len(seg), :sees] = True  # the prefix it continues
        attn[c:c + len(seg), c:c + len(seg)] = torch.ones(len(seg), len(seg), dtype=torch.bool).tril()
    tokens = torch.cat([seg for seg, _, _ in segments])
    positions = torch.cat([torch.arange(p, p + len(seg)) for seg, p, _ in segments])
    return tokens, positions, attn, first_col


def collate(rows, device):
    """Pad packed rows to one batch. Padding attends only to itself (a query that sees nothing
    would make softmax NaN) and has no label. Consistency columns become flat (row, column) pairs."""
    B, T = len(rows), max(len(r.tokens) for r in rows)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    attn = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
    labels = torch.full((B, T), -1, dtype=torch.long)
    student, teacher = [], []
    for b, r in enumerate(rows):
        L = len(r.tokens)
        tokens[b, :L], positions[b, :L], attn[b, :L, :L], labels[b, :L] = r.tokens, r.positions, r.attn, r.labels
        student.append(torch.stack([torch.full_like(r.student, b), r.student], 1))
        teacher.append(torch.stack([torch.full_like(r.teacher, b), r.teacher], 1))
    student, teacher = torch.cat(student), torch.cat(teacher)
    return [t.to(device) for t in (tokens, positions, attn, labels, student, teacher)]
