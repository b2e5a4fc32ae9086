"""``decoding=beam``: one model, Hugging Face beam search."""

from dataclasses import dataclass

from decoding.base import Decoder
from decoding.errors import FusemtError
from decoding.generate import GenerateDecoder
from decoding.methods import register


@register
class BeamDecoder(GenerateDecoder):
    name = "beam"
    search = "beam search"

    @dataclass
    class Config(Decoder.Config):
        num_beams: int = 4
        length_penalty: float = 1.0
        early_stopping: bool = True

    @classmethod
    def check_config(cls, cfg, n_models: int) -> None:
        super().check_config(cfg, n_models)
        if cfg.num_beams < 1:
            raise FusemtError(f"decoding.num_beams={cfg.num_beams}: must be at least 1")

    def generation_kwargs(self) -> dict:
        return {"do_sample": False, "num_beams": self.cfg.num_beams, "length_penalty": self.cfg.length_penalty,
                "early_stopping": self.cfg.early_stopping}
