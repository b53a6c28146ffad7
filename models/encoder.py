"""Pre-LayerNorm Transformer encoder with learned positions. Knows nothing about tasks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.dropout import Dropout
from models.multihead import MultiHeadAttention


@dataclass
class EncoderConfig:
    vocab_size: int
    max_len: int
    dim: int = 64
    depth: int = 2
    heads: int = 2
    head_dim: int = 32
    ffn_dim: int = 128
    dropout: float = 0.1
    cls: bool = False  # prepend a learned CLS vector (not a vocabulary id) after embedding
    # None: the token table keeps nn.Embedding's N(0, 1) and positions start N(0, 0.02); a float: both
    # start N(0, std) (the Nyströmformer authors' code: 0.02)
    embed_init_std: float | None = None


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig, attention: dict, attention_kwargs: dict) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = MultiHeadAttention(cfg.dim, cfg.heads, attention, head_dim=cfg.head_dim,
                                       max_len=cfg.max_len + int(cfg.cls), out_dropout=cfg.dropout,
                                       **attention_kwargs)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(), Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_dim, cfg.dim), Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.ffn(self.norm2(x))


class Encoder(nn.Module):
    """(B, L) token ids + (B, L) mask (True = real token) -> (B, L', dim) states, L' = L (+1 with CLS).

    Cross-layer sharing: after the layers are built, every later layer's backend that defines
    `tie_to(first: AttentionBackend) -> None` is handed layer 0's backend, and may take parameters from it
    (Linformer's `layerwise` sharing). Sharing thus stays inside one model instance: no class attribute,
    no global state, two models never share.
    """

    def __init__(self, cfg: EncoderConfig, attention: dict, **attention_kwargs) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_len + int(cfg.cls), cfg.dim))
        if cfg.embed_init_std is None:
            nn.init.normal_(self.pos, std=0.02)
        else:
            if cfg.embed_init_std <= 0:
                raise ValueError(f"model.embed_init_std must be > 0 or null, got {cfg.embed_init_std}")
            nn.init.normal_(self.embed.weight, std=cfg.embed_init_std)
            nn.init.normal_(self.pos, std=cfg.embed_init_std)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.cls else None
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, attention, attention_kwargs) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        first = self.blocks[0].attn.attn
        self.blocks[0].attn.check_length(cfg.max_len + int(cfg.cls))
        for block in self.blocks[1:]:
            tie = getattr(block.attn.attn, "tie_to", None)
            if tie is not None:
                tie(first)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = ids.shape
        x = self.embed(ids)  # (B, L, dim)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)  # (B, L+1, dim)
            mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)
        x = self.drop(x + self.pos[:, : x.shape[1]])
        # a batch without padding runs the layers unmasked: the same function (padding never changes real
        # positions), and backends skip their masking work; on a CPU the check costs no device sync
        layer_mask = None if mask.device.type == "cpu" and bool(mask.all()) else mask
        for block in self.blocks:
            x = block(x, layer_mask)
        return self.norm(x), mask
