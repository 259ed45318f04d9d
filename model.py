"""
A GPT language model in one file, nanoGPT-style, with its own KV cache.

Read from the smallest piece up: KVCache, CausalSelfAttention, MLP, Block, GPTConfig, pack, GPT.
Parameter names follow GPT-2 (transformer.wte, wpe, h.N.attn.c_attn, ...) so that GPT-2 weights
load one to one (extras/gpt2.py).

Three ways to call the model, all through GPT.forward:
  model(idx)                                   plain causal LM, logits for every position
  model(idx, input_pos=pos, attn_mask=mask)    packed training rows (pack): explicit positions
                                               and a boolean mask (True = may attend)
  model(idx, input_pos=range(a, b), cache=cache)
                                               decoding: keys/values of the new tokens are
                                               written into `cache` at slots a .. b-1
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class KVCache:
    """Preallocated keys and values of every layer, sized by the caller: (B, n_head, max_len, hs).

    Invariant: the decoding loop keeps a length `cached` (jacobi.py); slots before it hold keys and
    values computed from final tokens (a later write there writes the same values: collection
    re-runs a converged row's block), slots from it on are scratch.
    A forward writes its new tokens at slots `input_pos` and each query attends to every slot up
    to its own position, so rolling back a rejected guess costs nothing: the next forward simply
    overwrites the slots. The cache does not store `cached` itself; the decoding loop owns it.
    """

    def __init__(self, config, batch_size, max_len, device=None, dtype=torch.float32):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]

    def update(self, layer, input_pos, k, v, S):
        """Write k, v (B, nh, T, hs) at slots input_pos: a range (consecutive slots, the same for
        every row), or a tensor (B, T) with a position per row. A batch of B rows uses the cache's
        first B rows. Return the live slots (B, nh, S, hs), S = the last position + 1: no query
        looks further."""
        B = k.size(0)
        k, v = k.to(self.k[layer].dtype), v.to(self.v[layer].dtype)
        if isinstance(input_pos, range):
            self.k[layer][:B, :, input_pos.start:input_pos.stop] = k
            self.v[layer][:B, :, input_pos.start:input_pos.stop] = v
        else:
            slots = input_pos[:, None, :, None].expand_as(k)  # (B, nh, T, hs)
            self.k[layer][:B].scatter_(2, slots, k)
            self.v[layer][:B].scatter_(2, slots, v)
        return self.k[layer][:B, :, :S], self.v[layer][:B, :, :S]

    def copy_row(self, row, start, stop):
        """Give every row the keys and values of `row` at slots start .. stop-1 (a decoder that
        verifies several drafts as rows keeps the winning row's committed slots)."""
        for k, v in zip(self.k, self.v):
            k[:, :, start:stop] = k[row, :, start:stop]
            v[:, :, start:stop] = v[row, :, start:stop]

    def keep_rows(self, rows):
        """Drop the rows of finished sequences (rows: indices of those that go on)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.layer = layer  # index into the KV cache

    def forward(self, x, attn_mask=None, input_pos=None, cache=None):
        B, T, C = x.size()  # batch, new tokens, n_embd
        S = attn_mask.size(-1) if cache is not None else None  # live cache slots
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, input_pos, k, v, S)  # (B, nh, S, hs)
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, input_pos=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, input_pos, cache)  # pre-LayerNorm residual
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 256   # context length: the most positions a sequence may use
    vocab_size: int = 1024
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


def pack(segments):
    """Lay out sequences that each continue a prefix of the first, side by side in one row, for
    a forward with explicit positions and an attention mask (train_cllm.py packs its batches):

        row:        [p0 p1 p2 a b c] [d e] [f g]    segment 1 continues p0 p1 p2, segment 2 p0 p1
        positions:   0  1  2  3 4 5   3 4   2 3     each token at its place in its own sequence
        attention:  segment 0 causal; segment 1 sees columns 0..2 and itself causally; ..

    so that every logit equals the one a separate forward of prefix + segment gives.
    segments: [(tokens (L,), position of its first token, how many first columns it sees)], the
    first one (tokens, 0, 0). Returns tokens, positions (T,), attn (T, T) and the first column of
    every segment (plus T at the end)."""
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


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input/output embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def make_cache(self, batch_size=1):
        """An empty KV cache for the whole context."""
        w = self.lm_head.weight
        return KVCache(self.config, batch_size, self.config.block_size, w.device, w.dtype)

    def forward(self, idx, targets=None, input_pos=None, attn_mask=None, cache=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None).

        input_pos: absolute positions of the tokens: a range (consecutive positions, as decoding
                   uses: known on the host, so reading the last one costs no device sync), or a
                   tensor (T,) or (B, T); default 0..T-1.
        attn_mask: boolean (T, T) or (B, T, T), True where a query may attend to a key;
                   default causal. For packed rows of several sequences sharing a prefix.
        cache:     a KVCache; then input_pos is required, a range or (B, T) (rows at different
                   positions), the new keys and values go to slots input_pos and each query sees
                   every slot up to its own position.
        targets:   (B, T) next-token ids, -1 where no loss is taken (padding).
        """
        B, T = idx.size()
        if input_pos is None:
            assert cache is None, "decoding with a cache needs input_pos (the absolute positions)"
            input_pos = range(T)
        if isinstance(input_pos, range):
            assert len(input_pos) == T > 0, f"{len(input_pos)} positions for {T} tokens"
            last = input_pos[-1]
            pos = torch.arange(input_pos.start, input_pos.stop, device=idx.device)
        else:
            last, pos = int(input_pos.max()), input_pos.to(idx.device)
            assert cache is None or pos.dim() == 2, "a cache takes a range or (B, T) positions"
        if last >= self.config.block_size:
            raise ValueError(f"position {last} is past the context ({self.config.block_size})")
        if cache is not None:
            # SDPA's is_causal aligns the mask to the top-left corner, which is wrong for a block of
            # queries that sits at the end of a longer cached sequence: build the mask explicitly.
            attn_mask = torch.arange(last + 1, device=idx.device) <= pos[..., None]  # (T, S), (B, T, S)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask[:, None]  # (B, 1, T, T): the same mask for every head
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, n_embd)
        x = self.transformer.drop(x)
        slots = input_pos if isinstance(input_pos, range) else pos  # where the cache writes
        for block in self.transformer.h:
            x = block(x, attn_mask, slots, cache)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab): Jacobi needs every one
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, device_type):
        """AdamW, betas 0.9/0.99; weight decay on matrices (and embeddings), none on biases and
        LayerNorms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.99), fused=fused)
