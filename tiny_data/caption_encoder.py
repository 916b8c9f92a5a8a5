"""The toy's text encoder: a stand-in for Wan's umT5, learned with the DiT (train.py trains both)."""

import torch
import torch.nn as nn

from tiny_data import shapes


class CaptionEncoder(nn.Module):
    """Stands in for umT5 in the toy: token ids (B, Lt) -> features (B, Lt, text_dim), zero at padding (id 0).

    One small transformer layer, so a colour can bind to the shape after it. Zeroing the padded rows mirrors
    Wan's zero-padded text; the empty caption (all padding) is the unconditional prompt of CFG."""

    def __init__(self, vocab_size, text_dim, text_len):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, text_dim)
        self.pos = nn.Parameter(torch.randn(text_len, text_dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(text_dim, nhead=2, dim_feedforward=2 * text_dim,
                                                dropout=0.0, batch_first=True, norm_first=True)

    def forward(self, ids):
        x = self.layer(self.embed(ids) + self.pos[: ids.shape[1]])
        return x * (ids != 0).unsqueeze(-1)


    @torch.no_grad()
    def contexts(self, captions):
        """Captions -> (their features (B, Lt, text_dim), the empty caption's (1, Lt, text_dim)): the context and
        neg_context that rf.generate takes, on this encoder's device."""
        text_len, device = self.pos.shape[0], self.pos.device
        context = self(torch.from_numpy(shapes.tokenize_all(captions, text_len)).to(device))
        return context, self(torch.from_numpy(shapes.tokenize_all([""], text_len)).to(device))
