"""``decoding=greedy``: one model, Hugging Face greedy search."""

from dataclasses import dataclass

from decoding.base import Decoder
from decoding.generate import GenerateDecoder
from decoding.methods import register


@register
class GreedyDecoder(GenerateDecoder):
    name = "greedy"
    search = "greedy"

    @dataclass
    class Config(Decoder.Config):
        pass

    def generation_kwargs(self) -> dict:
        return {"do_sample": False, "num_beams": 1}
