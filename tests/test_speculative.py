"""Speculative decoding: lossless greedy (same and cross tokenizer), equal to HF assisted
generation, and the rejection sampler's output distribution (slow: embedded models)."""

import math

import pytest
import torch
from conftest import compose_run

from decoding.methods import decoder_class
from decoding.methods.speculative import SpeculativeDecoder
from decoding.model import load_model
from decoding.prompt import render_prompt
from decoding.sampling import warp

# The bundled sample's first lines: one of them makes SmolLM2 draft only a cut-off character (an empty proposal).
SOURCES = ["The weather is nice today.", "I would like a cup of coffee, please.", "Where is the train station?",
           "This book is very interesting."]


def build(*overrides):
    run = compose_run(*overrides)
    models = [load_model(spec) for spec in run.models]
    return decoder_class(run.decoding_name)(run.decoding, models, run.prompt), models, run


@pytest.fixture(scope="module")
def target_greedy():
    decoder, _, _ = build("models=gemma3_270m", "decoding=greedy", "decoding.max_new_tokens=40")
    return decoder.decode(SOURCES)


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["gemma3_selfdraft", "gemma3_smollm2"])
def test_greedy_speculative_is_target_greedy(pair, target_greedy):
    decoder, _, _ = build(f"models={pair}", "decoding=speculative", "decoding.max_new_tokens=40")
    outs = decoder.decode(SOURCES)
    assert [o.text for o in outs] == [o.text for o in target_greedy]
    for out, ref in zip(outs, target_greedy):
        ids = [s["ids"]["gemma3_270m"] for s in out.trace]
        assert ids == [s["ids"]["gemma3_270m"] for s in ref.trace]  # token for token
        assert 0 <= out.stats["acceptance_rate"] <= 1 and out.stats["rounds"] >= 1
        assert {s["origin"] for s in out.trace} <= {"draft", "target"}
        assert all("accepted" in s and "proposed" in s for s in out.trace if s["origin"] == "target")


@pytest.mark.slow
def test_adaptive_and_batched_rows_at_their_own_pace(target_greedy):
    decoder, _, _ = build("models=gemma3_selfdraft", "decoding=speculative", "decoding.max_new_tokens=40",
                          "decoding.adaptive=true", "decoding.num_draft_tokens=2")
    assert [o.text for o in decoder.decode(SOURCES)] == [o.text for o in target_greedy]


@pytest.mark.slow
def test_kv_cache_path_equals_full_recompute():
    common = ("models=gemma3_smollm2", "decoding=speculative", "decoding.max_new_tokens=16")
    cached, _, _ = build(*common)
    reference, _, _ = build(*common, "decoding.use_cache=false")
    def decisions(outs):  # log-probabilities differ in the last float bits between the two paths
        return [[{k: v for k, v in step.items() if k != "logprob"} for step in o.trace] for o in outs]

    assert decisions(cached.decode(SOURCES[:2])) == decisions(reference.decode(SOURCES[:2]))


@pytest.mark.slow
def test_equals_hf_assisted_generation_same_tokenizer():
    decoder, (target, draft), run = build("models=gemma3_selfdraft", "decoding=speculative",
                                          "decoding.max_new_tokens=24", "prompt.plain_stop_strings=[]")
    ours = decoder.decode(SOURCES[:1])[0]
    batch = render_prompt(target, SOURCES[:1], run.prompt)
    hf = target.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=24,
                               do_sample=False, assistant_model=draft.model, eos_token_id=target.end_ids,
                               pad_token_id=target.tokenizer.pad_token_id)
    hf_ids = hf[0, batch["input_ids"].shape[1]:].tolist()
    plain = target.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  max_new_tokens=24, do_sample=False, eos_token_id=target.end_ids,
                                  pad_token_id=target.tokenizer.pad_token_id)
    assert [s["ids"]["gemma3_270m"][0] for s in ours.trace] == hf_ids == plain[0, batch["input_ids"].shape[1]:].tolist()


def test_warp_top_p_keeps_the_smallest_nucleus():
    p = warp(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), temperature=1.0, top_p=0.8)
    assert torch.allclose(p, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]))


class _Stub:
    """Just enough of SpeculativeDecoder to run its verifier on hand-made distributions."""

    def __init__(self, temperature=1.0, top_p=1.0, seed=0):
        self.cfg = SpeculativeDecoder.Config(temperature=temperature, top_p=top_p)
        self.generator = torch.Generator().manual_seed(seed)

    _verify = SpeculativeDecoder._verify


@pytest.mark.parametrize("point_mass", [False, True])
def test_rejection_sampling_reproduces_the_target_distribution(point_mass):
    """chi-square over many draws of the first token: accept/resample must give exactly p."""
    p = torch.tensor([0.45, 0.25, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.5, 0.1, 0.2, 0.1])
    stub = _Stub()
    target_lp = torch.log(p).repeat(2, 1)  # predictions for the proposal and the bonus token
    counts = torch.zeros(5)
    draws = 20000
    for _ in range(draws):
        if point_mass:  # a cross-tokenizer proposal: always the same token, q = 1 on it
            x, q_rows = 1, None
        else:
            x = int(torch.multinomial(q, 1, generator=stub.generator))
            q_rows = q[None, :]
        n_acc, nxt = stub._verify([x], target_lp, q_rows, stub.generator)
        counts[x if n_acc == 1 else nxt] += 1
    expected = p * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, (counts, chi2)  # chi-square, 4 dof, p = 0.001
    assert not math.isnan(chi2)
