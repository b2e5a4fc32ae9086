"""The method registry: every registered method has its config file and its docs entry, every shipped
decoding and experiment config composes and passes its method's start-up checks, and the registry
refuses what would break it. No model is loaded."""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import compose_run

from decoding.base import Decoder
from decoding.methods import DECODERS, decoder_class, register
from runners.config import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
DECODING_CONFS = sorted(p.stem for p in (CONF_DIR / "decoding").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def documented_methods() -> set[str]:
    """Methods with an entry in the methods documentation (docs/methods.md; before the docs split,
    README's "Decoding methods" section): a ``## <name>`` heading or a paragraph opening ``**<name>**``."""
    methods_doc = ROOT / "docs" / "methods.md"
    if methods_doc.exists():
        text = methods_doc.read_text(encoding="utf-8")
    else:
        text = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("## Decoding methods, exactly", 1)[1]
        text = text.split("\n## ", 1)[0]
    return set(re.findall(r"^## ([a-z_]+)\s*$", text, re.M)) | set(re.findall(r"^\*\*([a-z_]+)\*\*[ ,]", text, re.M))


def test_registered_methods_are_the_decoding_configs_and_the_documented_methods():
    assert sorted(DECODERS) == DECODING_CONFS
    assert set(DECODERS) <= documented_methods(), "every method needs its entry in the methods docs"


@pytest.mark.parametrize("method", DECODING_CONFS)
def test_every_decoding_config_composes_and_passes_its_checks(method):
    # A pair: the ensembles and speculative need two members; greedy/beam run on the first.
    run = compose_run(f"decoding={method}", "models=gemma3_smollm2")
    cls = decoder_class(run.decoding_name)
    assert run.decoding_name == method and isinstance(run.decoding, cls.Config)
    cls.check_config(run.decoding, len(run.models))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_config_composes_and_passes_its_checks(experiment):
    run = compose_run(f"experiment={experiment}")
    cls = decoder_class(run.decoding_name)
    assert isinstance(run.decoding, cls.Config)
    cls.check_config(run.decoding, len(run.models))


def test_every_method_describes_its_trace_origins():
    models = ["gemma3_270m", "smollm2_135m"]
    for name, cls in DECODERS.items():
        one = models[:1] if cls.max_models == 1 else models
        for origin in ["both", "all", "lookup", "draft", "target", "fused", *one, "+".join(one)]:
            meaning = cls.origin_meaning(origin, one)
            assert isinstance(meaning, str) and meaning, (name, origin)


def test_register_refuses_a_duplicate_a_non_decoder_and_an_abstract_class():
    unite = DECODERS["unite"]

    class Clash(unite):
        name = "unite"

    with pytest.raises(TypeError, match="already registered"):
        register(Clash)
    with pytest.raises(TypeError, match="not a Decoder"):
        register(type("NotADecoder", (), {"name": "nothing"}))

    class Undescribed(Decoder):  # no origin_meaning (nor prepare/step/finish)
        name = "undescribed"

        @dataclass
        class Config(Decoder.Config):
            pass

    with pytest.raises(TypeError, match="abstract"):
        register(Undescribed)
    with pytest.raises(TypeError, match="Stats"):
        register(type("StatsLess", (DECODERS["greedy"],), {"name": "statsless", "Stats": dict}))
    assert DECODERS["unite"] is unite and not {"undescribed", "statsless"} & set(DECODERS)
    register(unite)  # registering the same class again (a module imported twice) is harmless


def test_the_trace_legend_reads_the_method_and_never_lends_another_methods_text():
    from eval.trace import origin_meaning

    assert origin_meaning("charwise", "fused", ["a", "b"]) == DECODERS["charwise"].origin_meaning("fused", ["a", "b"])
    unknown = origin_meaning("no_such_method", "lookup", ["a", "b"])
    assert "top-k" not in unknown and "no_such_method" in unknown
