"""``decoding=greedy``: one model, Hugging Face greedy search."""

from dataclasses import dataclass

from decoding.base import Decoder, register
from decoding.generate import GenerateDecoder


@register
class GreedyDecoder(GenerateDecoder):
    name = "greedy"

    @dataclass
    class Config(Decoder.Config):
        pass

    def generation_kwargs(self) -> dict:
        return {"do_sample": False, "num_beams": 1}
