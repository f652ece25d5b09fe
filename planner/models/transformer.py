"""A small BERT-like encoder: the built-in transformer workload.

Token + position embeddings, six post-LayerNorm encoder layers (d_model 256,
4 heads, feed-forward 1024, GELU), then BERT's pooler (first token → dense →
tanh) and a linear classifier. Attention is written out with
``scaled_dot_product_attention`` rather than ``nn.TransformerEncoderLayer``
because the latter's inference fast path branches on runtime state, which
``torch.export`` would have to specialise away. Input: int64 token ids
``1×128``; output: logits ``1×num_labels`` (or hidden states with ``pooled=False``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SEED = 0
VOCAB_SIZE = 30522


class SelfAttention(nn.Module):
    """Multi-head self-attention over the whole sequence (no padding mask)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, dim = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v)
        return self.out(attn.transpose(1, 2).reshape(batch, seq, dim))


class EncoderLayer(nn.Module):
    """Post-LN encoder layer as in BERT: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, d_model: int, heads: int, ff: int) -> None:
        super().__init__()
        self.attn = SelfAttention(d_model, heads)
        self.ln1 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, ff)
        self.ff2 = nn.Linear(ff, d_model)
        self.ln2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


class TinyBert(nn.Module):
    """Embeddings → N encoder layers → pooler → classifier."""

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        max_len: int = 512,
        d_model: int = 256,
        heads: int = 4,
        ff: int = 1024,
        layers: int = 6,
        num_labels: int = 2,
        pooled: bool = True,
    ) -> None:
        super().__init__()
        self.pooled = pooled
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.ln = nn.LayerNorm(d_model)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, ff) for _ in range(layers))
        self.pool = nn.Linear(d_model, d_model)
        self.classifier = nn.Linear(d_model, num_labels)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.ln(self.tok(ids) + self.pos(positions))
        for layer in self.layers:
            x = layer(x)
        if not self.pooled:
            return x
        return self.classifier(torch.tanh(self.pool(x[:, 0])))


def build_transformer(seq_len: int = 128, pooled: bool = True) -> tuple[nn.Module, tuple[Tensor]]:
    """Seeded TinyBert in eval mode and deterministic int64 token ids ``1×seq_len``."""
    gen = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = TinyBert(pooled=pooled).eval()
    ids = torch.randint(0, VOCAB_SIZE, (1, seq_len), generator=gen, dtype=torch.int64)
    return model, (ids,)
