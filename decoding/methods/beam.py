"""``decoding=beam``: one model, Hugging Face beam search."""

from dataclasses import dataclass

from decoding.base import Decoder, register
from decoding.generate import GenerateDecoder


@register
class BeamDecoder(GenerateDecoder):
    name = "beam"

    @dataclass
    class Config(Decoder.Config):
        num_beams: int = 4
        length_penalty: float = 1.0
        early_stopping: bool = True

    def generation_kwargs(self) -> dict:
        return {"do_sample": False, "num_beams": self.cfg.num_beams, "length_penalty": self.cfg.length_penalty,
                "early_stopping": self.cfg.early_stopping}
