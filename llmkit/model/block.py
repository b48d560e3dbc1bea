"""Transformer blocks, chosen by name from `conf/model/block/`. The forward is the architecture."""

from __future__ import annotations

from torch import Tensor, nn

from llmkit.model.positions import PositionContext
from llmkit.registry import Registry

BLOCKS: Registry["PreLNBlock"] = Registry("block")


@BLOCKS.register("pre_ln")
class PreLNBlock(nn.Module):
    """Norm before each sublayer (GPT-2, Llama); the stack needs a final norm."""

    final_norm = True

    def __init__(self, attention: nn.Module, ffn: nn.Module, norm_1: nn.Module, norm_2: nn.Module) -> None:
        super().__init__()
        self.attention, self.ffn = attention, ffn
        self.norm_1, self.norm_2 = norm_1, norm_2

    def forward(self, x: Tensor, ctx: PositionContext) -> Tensor:
        x = x + self.attention(self.norm_1(x), ctx)
        x = x + self.ffn(self.norm_2(x))
        return x


@BLOCKS.register("post_ln")
class PostLNBlock(PreLNBlock):
    """Norm after each residual sum, as in the original Transformer; its output is already normed."""

    final_norm = False

    def forward(self, x: Tensor, ctx: PositionContext) -> Tensor:
        x = self.norm_1(x + self.attention(x, ctx))
        x = self.norm_2(x + self.ffn(x))
        return x
