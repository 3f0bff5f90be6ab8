"""The text branch: the Dual-Path paper's deep text CNN over word ids, or VSE++'s GRU.

The paper feeds one-hot words to a 1x1 convolution with bias; that is an embedding lookup plus a
bias added at every position, padding included (an all-zero one-hot still yields the bias). Then
four stages of residual bottleneck blocks whose inner convolution has width 2 along the words,
padded on the left only so a stride of 1 keeps the length; max pooling over the positions; head.

Widths follow the paper with ``width`` = 256: stages output w, 2w, 4w, 8w channels; only the first
block of the first stage narrows (to w/2); the projection blocks of the later stages keep their
full width; identity blocks narrow to a quarter. Stages 2 and 3 halve the length.

:class:`TextGRU` (``model.text_encoder: gru``) is the text encoder of VSE++: word embeddings and a
recurrent network, here one bidirectional GRU layer whose outputs are max-pooled over the caption's
words, with the same head and output width as the CNN, so everything after it is the same.

Both heads end in BatchNorm, with or without its ReLU (``final_relu``; ``model.embedding``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imtext.models.image import projection_head

#: Stride of each stage's first block (paper: res-A 1, res-B 2, res-C 2, res-D 1).
STAGE_STRIDES = (1, 2, 2, 1)
#: Strides that keep every position: a stride-2 projection shortcut (1x1) reads only every other
#: position, and on short captions that loses words (docs/training.md, the text proxy).


class WordConv(nn.Module):
    """Convolution of width 2 along the words with one zero on the left: (N, C, L) -> (N, C', L/s)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_ch, out_ch, kernel_size=2, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (1, 0)))


def conv_bn(in_ch: int, out_ch: int, stride: int = 1, width2: bool = False) -> nn.Sequential:
    conv = (
        WordConv(in_ch, out_ch, stride)
        if width2
        else nn.Conv1d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)
    )
    return nn.Sequential(conv, nn.BatchNorm1d(out_ch))


class Bottleneck(nn.Module):
    """1x1 -> width-2 (stride) -> 1x1, BN after each conv, ReLU inside and after the residual sum."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(in_ch, mid_ch),
            nn.ReLU(inplace=True),
            conv_bn(mid_ch, mid_ch, stride, width2=True),
            nn.ReLU(inplace=True),
            conv_bn(mid_ch, out_ch),
        )
        project = in_ch != out_ch or stride != 1
        self.shortcut = conv_bn(in_ch, out_ch, stride) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def text_stages(
    in_ch: int, width: int, blocks: list[int], strides: Sequence[int] = STAGE_STRIDES
) -> nn.Sequential:
    """The four residual stages, the first block of each with its stride; output ``8 * width``."""
    layers: list[nn.Module] = []
    for stage, (count, stride) in enumerate(zip(blocks, strides, strict=True)):
        out_ch = width * 2**stage
        # The first stage's projection block narrows to half; later ones keep full width.
        first_mid = out_ch // 2 if stage == 0 else out_ch
        layers.append(Bottleneck(in_ch, first_mid, out_ch, stride))
        layers += [Bottleneck(out_ch, max(1, out_ch // 4), out_ch, 1) for _ in range(count - 1)]
        in_ch = out_ch
    return nn.Sequential(*layers)


class TextCNN(nn.Module):
    """Word ids (N, L) int64, 0 = padding -> features (N, embed_dim), not normalised."""

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        width: int,
        blocks: list[int],
        embed_dim: int,
        final_relu: bool = True,
        strides: Sequence[int] = STAGE_STRIDES,
    ) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.word_bias = nn.Parameter(torch.zeros(word_dim))
        self.word_bn = nn.BatchNorm1d(word_dim)
        self.stages = text_stages(word_dim, width, blocks, strides)
        self.head = projection_head(8 * width, embed_dim, layers=1, final_relu=final_relu)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = (self.words(tokens) + self.word_bias).transpose(1, 2)  # (N, word_dim, L)
        x = self.stages(self.word_bn(x))
        return self.head(x.amax(dim=2))


class TextGRU(nn.Module):
    """Word ids (N, L) int64, 0 = padding -> features (N, embed_dim), not normalised.

    One bidirectional GRU layer of ``4 * width`` units each way (``8 * width`` outputs, the width of
    the CNN's last stage) over the word vectors; each output channel's maximum over the positions
    that hold a word (padding is left out, wherever the position shift put it); then the head.
    """

    def __init__(
        self, vocab_size: int, word_dim: int, width: int, embed_dim: int, final_relu: bool = True
    ) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, 4 * width, batch_first=True, bidirectional=True)
        self.head = projection_head(8 * width, embed_dim, layers=1, final_relu=final_relu)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.words(tokens))  # (N, L, 8 * width)
        # A large finite floor rather than -inf: a caption of padding only stays finite.
        words = (tokens > 0).unsqueeze(2)
        pooled = states.masked_fill(~words, -1e4).amax(dim=1)
        return self.head(pooled)
