"""Character-level probabilities over covers (``decoding/charprob.py``) and ``decoding=charwise``.

The exact invariants run on the scripted toy LM (``tests/toy_lm.py``, seconds) against brute-force
enumeration of every tokenization; a few slow tests run the embedded Gemma 3 + SmolLM2 pair.
"""

import dataclasses
import heapq
import math

import numpy as np
import pytest
import torch
from conftest import compose_run
from toy_lm import TOY_CHARS, TOY_PROMPT, brute_char_greedy, brute_end_prob, brute_prefix_prob, script, toy_model

from decoding.charprob import CharMasses, CharModel, CoverBeam, CoverConfig, char_tables, split_anchor
from decoding.methods import decoder_class
from decoding.methods.charwise import CharwiseDecoder
from decoding.prompt import render_prompt
from decoding.stream import ModelStream
from decoding.vocab import utf8_pending

EXACT = CoverConfig(beam_size=0, prune_threshold=0.0)
KINDS = ["sp", "bpe"]
TEXT = "aあい b あ"  # ASCII, kana, spaces; byte fallback (sp) and partial pieces (bpe) in its covers


def char_model(model, prompts=None, cfg=EXACT, backoff=1, recompute=False):
    prompts = prompts or [[model.tokenizer.bos_token_id]]
    return CharModel(model, prompts, cfg, backoff, recompute)


def resolve(member, seqs=(0,)):
    while member.score({s: [node.path for node in member.beams[s].frontier()] for s in seqs}, list(seqs)):
        pass
    return [member.beams[s].masses() for s in seqs]


def prefixes(text):
    """(text so far, next character) along ``text``, then (text, None)."""
    data = text.encode()
    cuts = [i for i in range(len(data) + 1) if i == len(data) or data[i] & 0xC0 != 0x80]
    return [(data[:a], data[a:b]) for a, b in zip(cuts, cuts[1:])] + [(data, None)]


def close(a, b, rel=1e-9, abs_=1e-13):
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


# --- the exact quantity ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_masses_equal_brute_force_over_all_tokenizations(kind):
    model = toy_model(kind)
    member, context = char_model(model), (model.tokenizer.bos_token_id,)
    beam = member.beams[0]
    for text, char in prefixes(TEXT):
        (masses,) = resolve(member)
        scale = math.exp(beam.log_scale)
        assert close(math.exp(beam.prefix_logprob()), brute_prefix_prob(model, context, text))
        for c in ["a", "b", " ", "あ", "い", "x"]:
            assert close(masses.mass(c.encode()) * scale,
                         brute_prefix_prob(model, context, text + c.encode())), (text, c)
        assert close(masses.end * scale, brute_end_prob(model, context, text))
        if char:
            beam.advance(char)


@pytest.mark.parametrize("kind", KINDS)
def test_next_character_distribution_is_normalised(kind):
    model = toy_model(kind, valid_utf8=True)  # no mass is lost to invalid UTF-8: nothing to renormalise
    member = char_model(model)
    beam = member.beams[0]
    for text, char in prefixes(TEXT):
        (masses,) = resolve(member)
        assert close(masses.total, beam.bound(), rel=1e-6)  # fp32 next-token probabilities
        top = masses.top(1000)
        assert len(top) > 5 and close(sum(masses.prob(c) for c, _ in top), 1.0, rel=1e-12)
        if char:
            beam.advance(char)


@pytest.mark.parametrize("kind", KINDS)
def test_chain_rule_equals_sum_over_tokenizations(kind):
    model = toy_model(kind, valid_utf8=True)
    member = char_model(model)
    product = 1.0
    for text, char in prefixes(TEXT):
        (masses,) = resolve(member)
        product *= masses.prob(char)
        if char:
            member.beams[0].advance(char)
    assert close(product, brute_end_prob(model, (model.tokenizer.bos_token_id,), TEXT.encode()), rel=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_consistency(kind):
    model = toy_model(kind)
    text = "aあ".encode()
    member = char_model(model)
    member.beams[0].advance(text)
    (masses,) = resolve(member)
    whole = member.beams[0].prefix_logprob()
    parts = masses.end * math.exp(member.beams[0].log_scale)
    invalid = math.exp(whole) - masses.total * math.exp(member.beams[0].log_scale)
    for char, _ in masses.top(1000):
        if char is not None:
            longer = char_model(model)
            longer.beams[0].advance(text + char)
            resolve(longer)
            parts += math.exp(longer.beams[0].prefix_logprob())
    assert invalid >= 0 and close(math.exp(whole), parts + invalid)
    # and the invalid share is what brute force leaves out of the valid characters and END
    valid = sum(brute_prefix_prob(model, (model.tokenizer.bos_token_id,), text + c) for c, _ in masses.top(1000) if c)
    assert close(parts, valid + brute_end_prob(model, (model.tokenizer.bos_token_id,), text))


def test_pruning_is_a_lower_bound_rising_with_the_beam_and_exact_when_large():
    model = toy_model("sp", sharpness=1.0)  # flat: many covers matter
    text = "aあい bあ".encode()

    def prefix_prob(cfg):
        member = char_model(model, cfg=cfg)
        for _, char in prefixes(text.decode())[:-1]:
            resolve(member)
            member.beams[0].advance(char)
        resolve(member)
        return math.exp(member.beams[0].prefix_logprob())

    exact = brute_prefix_prob(model, (model.tokenizer.bos_token_id,), text)
    pruned = [prefix_prob(CoverConfig(beam_size=k, prune_threshold=0.0)) for k in (1, 2, 3, 5, 8, 64)]
    assert all(p <= exact * (1 + 1e-9) for p in pruned)
    assert all(a <= b * (1 + 1e-9) for a, b in zip(pruned, pruned[1:]))
    assert pruned[0] < exact * 0.999 and close(pruned[-1], exact) and close(prefix_prob(EXACT), exact)
    assert prefix_prob(CoverConfig(beam_size=0, prune_threshold=0.05)) < exact


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_boundary_invariance(kind):
    """The same distribution whether the prompt ends on a token boundary, inside a token or right
    after a character the tokenizer splits, once the anchor is the same."""
    model = toy_model(kind)
    tok = model.tokenizer
    whole = "ab aい"

    def distribution(prompt, backoff):
        ids = tok(prompt)["input_ids"]
        member = char_model(model, [ids], backoff=backoff)
        member.beams[0].advance(whole.encode()[len(prompt.encode()):])
        (masses,) = resolve(member)
        return split_anchor(model.vocab, ids, backoff)[0], {c: masses.prob(c) for c, _ in masses.top(50)}

    anchor, reference = distribution("", 1)
    for cut in ["a", "ab", "ab ", "ab a", whole]:  # "a": inside the token "ab"; "ab a": before the split い
        other_anchor, dist = distribution(cut, 100)
        assert other_anchor == anchor
        assert dist.keys() == reference.keys() and all(close(dist[c], reference[c]) for c in dist)
    # the default backoff re-covers the last token, and never ends the anchor inside a character
    assert distribution("ab", 1)[0] == anchor
    bpe = toy_model("bpe")
    ids = bpe.tokenizer("aい")["input_ids"]  # a, e3 81, 84
    assert split_anchor(bpe.vocab, ids, 1) == (ids[:2], "い".encode())


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_covers_are_the_tokenizers_own_encoding(kind):
    model = toy_model(kind)
    bos = model.tokenizer.bos_token_id
    member = CharModel(model, [[bos]], EXACT, 1, False, canonical=True)
    exact = char_model(model)
    for text, char in prefixes(TEXT)[:-1]:
        resolve(member)
        resolve(exact)
        member.beams[0].advance(char)
        exact.beams[0].advance(char)
        hyps, data = member.beams[0].hypotheses(), text + char
        for h in hyps:  # complete tokens: the tokenizer's encoding of their text (rounded up to a character)
            end = len(b"".join(model.vocab.token_bytes[t] for t in h.path))
            while end < len(data) and data[end] & 0xC0 == 0x80:
                end += 1
            own = model.tokenizer.encode(data[:end].decode(), add_special_tokens=False)
            assert tuple(own[: len(h.path)]) == h.path
        assert hyps and len(hyps) <= len(exact.beams[0].hypotheses())
    resolve(member)
    resolve(exact)
    assert member.beams[0].prefix_logprob() < exact.beams[0].prefix_logprob()


@pytest.mark.parametrize("kind", KINDS)
def test_cache_equals_recompute(kind):
    model = toy_model(kind)
    prompts = [model.tokenizer(s)["input_ids"] for s in ["ab", "aい", "b a"]]
    cached, fresh = char_model(model, prompts), char_model(model, prompts, recompute=True)
    for _, char in prefixes("あ aい")[:-1]:
        for a, b in zip(resolve(cached, (0, 1, 2)), resolve(fresh, (0, 1, 2))):
            assert a.top(100) == b.top(100)
        for member in (cached, fresh):
            for beam in member.beams:
                beam.advance(char)


def test_select_rows_with_repeated_rows_copies_rows_and_cache():
    model = toy_model("bpe")
    bos = model.tokenizer.bos_token_id
    stream = ModelStream(model, [[bos], [bos]])
    stream.append(0, [3])
    stream.append(1, [4])
    stream.logprobs()
    stream.select_rows([1, 0, 0])
    stream.append(1, [16])
    stream.append(2, [12, 13])
    stream.rollback(0, 1)
    stream.append(0, [5])
    out = stream.logprobs()
    for row, context in enumerate([(bos, 5), (bos, 3, 16), (bos, 3, 12, 13)]):
        assert torch.equal(out[row],
                           model.model(torch.tensor([context]), torch.ones(1, len(context)), None).logits[0, -1]
                           .log_softmax(-1))
    assert stream.tokens == [[bos, 5], [bos, 3, 16], [bos, 3, 12, 13]]


# --- decoding=charwise on the toy ---------------------------------------------------------------------

def charwise(models, sources, **options):
    options = {"max_new_tokens": 12, "max_repeats": 0, **options}
    return CharwiseDecoder(CharwiseDecoder.Config(name="charwise", **options), models, TOY_PROMPT).decode(sources)


def raw(out):
    return b"".join(bytes.fromhex(s["piece_bytes"]) for s in out.trace)


EXACT_OPTIONS = {"beam_size": 0, "prune_threshold": 0.0, "max_new_tokens": 6}


def reference_greedy(model, source, max_chars=6):
    ids = model.tokenizer(source)["input_ids"]
    anchor, prefix = split_anchor(model.vocab, ids, 1)
    return brute_char_greedy(model, tuple(anchor), max_chars, prefix)


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_with_itself_is_its_character_level_greedy(kind):
    model = toy_model(kind, sharpness=3.0)
    sources = ["ab", "aい", "b"]
    for fast_path in (True, False):
        outs = charwise([model, model], sources, fast_path=fast_path, **EXACT_OPTIONS)
        assert [raw(o).decode() for o in outs] == [reference_greedy(model, s) for s in sources]
        assert all(o.stats["agreement_rate"] == 1.0 for o in outs)


def test_character_greedy_differs_from_token_greedy():
    """Tokens w .3, xy .26, xz .24, xq .2: token greedy says w, the characters say x (mass .7), then y."""
    model = toy_model("sp")
    bos = model.tokenizer.bos_token_id
    script(model, [bos], {"w": 0.3, "xy": 0.26, "xz": 0.24, "xq": 0.2})
    for piece in ("w", "xy", "xz", "xq"):
        script(model, [bos, model.tokenizer.convert_tokens_to_ids(piece)], {"</s>": 1.0})
    token_greedy = model.tokenizer.convert_ids_to_tokens(int(model.model.next_logprobs((bos,)).argmax()))
    assert token_greedy == "w"
    for members in ([model], [model, model]):
        (out,) = charwise(members, [""], **EXACT_OPTIONS)
        assert out.text == "xy" == brute_char_greedy(model, (bos,), 5)
        assert out.trace[0]["p"][model.name] == pytest.approx(0.7, abs=1e-6)


@pytest.mark.parametrize("rule", ["mixture", "product"])
def test_one_hot_weights_reproduce_the_member(rule):
    sp, bpe = toy_model("sp", sharpness=3.0), toy_model("bpe", seed=1, sharpness=3.0)
    sources = ["ab", "aい"]
    for weights, member in (([1, 0], sp), ([0, 1], bpe)):
        fused = charwise([sp, bpe], sources, weights=weights, rule=rule, **EXACT_OPTIONS)
        alone = charwise([member], sources, rule=rule, **EXACT_OPTIONS)
        assert [o.text for o in fused] == [o.text for o in alone]
        assert [raw(o).decode() for o in fused] == [reference_greedy(member, s) for s in sources]


@pytest.mark.parametrize("rule", ["mixture", "product"])
def test_unanimity(rule):
    sp, bpe = toy_model("sp", sharpness=2.0), toy_model("bpe", seed=3, sharpness=2.0)
    outs = charwise([sp, bpe], ["ab", "aい", "b a", "あ"], rule=rule, max_new_tokens=16)
    agreed = [s for o in outs for s in o.trace if len(set(s["argmax"].values())) == 1]
    assert agreed and all(s["piece"] == s["argmax"][sp.name] or (s.get("end") and s["argmax"][sp.name] == "<end>")
                          for s in agreed)


def test_batch_of_8_equals_8_single_runs():
    sp, bpe = toy_model("sp", sharpness=2.0), toy_model("bpe", seed=2, sharpness=2.0)
    sources = ["ab", "aい", "b a", "あ", "a", "い b", "ba", "a あ"]
    options = {"max_new_tokens": 10}
    batched = charwise([sp, bpe], sources, **options)
    single = [charwise([sp, bpe], [s], **options)[0] for s in sources]
    assert [raw(o) for o in batched] == [raw(o) for o in single]
    assert [[s["p"] for s in o.trace] for o in batched] == [[s["p"] for s in o.trace] for o in single]


def test_scoring_nodes_over_their_spans_equals_the_whole_vocabulary(monkeypatch):
    """``score_nodes`` gathers only the sorted positions a node can still need (``CoverBeam.span``): a
    span too narrow would read other tokens' sums. Every span widened to the whole vocabulary gives
    the same characters and probabilities (up to the sums' rounding)."""
    from decoding.charprob import CoverBeam
    sp, bpe = toy_model("sp", sharpness=2.0), toy_model("bpe", seed=2, sharpness=2.0)
    sources = ["ab", "aい", "b a", "あ", "a あ"]
    options = {"max_new_tokens": 12, "fast_path": False}
    spanned = charwise([sp, bpe], sources, **options)
    monkeypatch.setattr(CoverBeam, "span", lambda self, path: (0, len(self.tables.keys)))
    whole = charwise([sp, bpe], sources, **options)
    assert [raw(o) for o in spanned] == [raw(o) for o in whole]
    for a, b in zip(spanned, whole):
        assert len(a.trace) == len(b.trace)
        for s, t in zip(a.trace, b.trace):
            assert all(close(s["p"][name], t["p"][name]) for name in s["p"]), s


@pytest.mark.parametrize("options", [{}, {"rule": "product", "beam_size": 2, "prune_threshold": 0.01},
                                     {"fast_path": False}])
def test_children_kept_as_arrays_equal_children_made_nodes_at_once(monkeypatch, options):
    """A cover beam keeps the nodes inside the next character as arrays (``Children``) until one is needed
    on its own, then makes it a node at the rank it was given. Making every child a node as soon as it is
    spawned, as the beam once did, gives the same outputs, traces and stats, bit for bit; and the beam's
    nodes stay in rank order (every sum over them adds in the same order)."""
    sp, bpe = toy_model("sp", sharpness=1.0), toy_model("bpe", seed=5, sharpness=1.0)  # flat: many children
    sources = ["ab", "aい", "b a", "あ", "a あ"]
    frontier = CoverBeam.frontier

    def frontier_in_rank_order(self, *args, **kwargs):
        found = frontier(self, *args, **kwargs)
        ranks = [node.rank for node in self.nodes.values()]
        assert ranks == sorted(ranks)
        return found

    monkeypatch.setattr(CoverBeam, "frontier", frontier_in_rank_order)
    kept = charwise([sp, bpe], sources, max_new_tokens=12, **options)
    expand = CoverBeam._expand

    def expand_and_make_every_child(self, node, out):
        expand(self, node, out)
        self._take(lambda weights: np.ones(len(weights), dtype=bool))
        assert not self.children

    monkeypatch.setattr(CoverBeam, "_expand", expand_and_make_every_child)
    made = charwise([sp, bpe], sources, max_new_tokens=12, **options)
    assert [dataclasses.asdict(o) for o in kept] == [dataclasses.asdict(o) for o in made]


def test_closed_tokens_sums_come_to_the_host_once_per_step_for_every_sequence(monkeypatch):
    """A closed token's sums over the whole vocabulary stay where they were computed (``ClosedSums``):
    the level brings over its root characters' masses, and once the characters are chosen each member
    brings the slices every sequence's closed tokens need in one transfer, so a beam's own ``advance``
    finds nothing left to fetch. Output and trace are those of the same run fetching beam by beam."""
    from decoding import charprob
    sp, bpe = toy_model("sp", sharpness=1.0), toy_model("bpe", seed=5, sharpness=1.0)
    sources = ["ab", "aい", "b a", "あ"]
    fetch, left = charprob.fetch_sums, []
    monkeypatch.setattr(charprob, "fetch_sums", lambda needed: (left.append(len(needed)), fetch(needed)))
    batched = charwise([sp, bpe], sources, max_new_tokens=12)
    assert left and not any(left)
    decoder = CharwiseDecoder(CharwiseDecoder.Config(name="charwise", max_new_tokens=30, max_repeats=0), [sp, bpe],
                              TOY_PROMPT)
    state = decoder.prepare(sources)
    while decoder.step(state):
        pass
    assert any(s[-1].end for s in state.steps)  # some sequences ended: their sums were let go too
    assert not [node for member in state.members for beam in member.beams for node in beam.nodes.values()
                if isinstance(node.cum, charprob.ClosedSums)]
    monkeypatch.setattr("decoding.methods.charwise.fetch_sums", lambda needed: None)  # each beam fetches its own
    by_beam = charwise([sp, bpe], sources, max_new_tokens=12)
    assert any(left)
    assert [dataclasses.asdict(o) for o in batched] == [dataclasses.asdict(o) for o in by_beam]


def test_char_masses_sum_each_characters_masses_in_the_order_they_were_added():
    """``CharMasses`` keeps the masses nodes add as arrays and sums them per character with numpy: the
    masses, the total and the top characters equal adding them one by one in a dict, to the last bit."""
    tables = char_tables(toy_model("bpe").vocab)
    rng = np.random.default_rng(0)
    roots = list(range(len(tables.root.keys)))
    ids = roots + [tables.char_id(c.encode()) for c in "漢字試験"]  # characters no token starts with
    masses = CharMasses(tables)
    masses.dense[:] = rng.random(len(roots)) * (rng.random(len(roots)) < 0.5)
    masses.end = 0.3
    added: dict[bytes, float] = {}
    for _ in range(6):
        part = rng.choice(ids, size=8)
        values = rng.random(8) * 10.0 ** rng.uniform(-9, 0, 8)  # wide magnitudes: the order of the sums shows
        masses.add(part, values)
        for i, v in zip(part.tolist(), values.tolist()):
            added[tables.chars[i]] = added.get(tables.chars[i], 0.0) + v

    def mass(char):
        i = tables.root_index.get(char)
        return (float(masses.dense[i]) if i is not None else 0.0) + added.get(char, 0.0)

    assert [masses.mass(tables.chars[i]) for i in ids] == [mass(tables.chars[i]) for i in ids]
    assert masses.total == float(masses.dense.sum()) + sum(added.values()) + masses.end
    every = {None: masses.end} | {tables.root.keys[i]: mass(tables.root.keys[i]) for i in np.flatnonzero(masses.dense)}
    every |= {char: mass(char) for char in added}
    for k in (1, 3, 10, 100):
        assert masses.top(k) == heapq.nsmallest(k, every.items(), key=lambda cm: (-cm[1], cm[0] is None, cm[0] or b""))
    tie = CharMasses(tables)  # equal masses at the k-th place: the smaller bytes, as a sort over all of them
    tie.add(np.array([tables.char_id("漢".encode()), tables.char_id("字".encode()), tables.char_id("試".encode())]),
            np.array([0.5, 0.25, 0.25]))
    assert tie.top(2) == [("漢".encode(), 0.5), (min("字".encode(), "試".encode()), 0.25)]


@pytest.mark.parametrize("rule", ["mixture", "product"])
def test_cached_decoding_equals_recompute(rule):
    sp, bpe = toy_model("sp", sharpness=2.0), toy_model("bpe", seed=2, sharpness=2.0)
    sources = ["ab", "aい", "b a"]
    cached = charwise([sp, bpe], sources, rule=rule)
    recomputed = charwise([sp, bpe], sources, rule=rule, use_cache=False)
    assert [[(s["piece"], s["p"]) for s in o.trace] for o in cached] == \
        [[(s["piece"], s["p"]) for s in o.trace] for o in recomputed]


@pytest.mark.parametrize("options", [{}, {"rule": "product"}, {"temperature": 0.8, "seed": 3},
                                     {"covers": "canonical"}, {"beam_size": 2, "prune_threshold": 0.01}])
def test_output_is_valid_utf8_one_step_per_character(options):
    sp, bpe = toy_model("sp", sharpness=1.0), toy_model("bpe", seed=5, sharpness=1.0)  # flat: byte pieces are likely
    outs = charwise([sp, bpe], ["ab", "aい", "b a", "あ"], max_new_tokens=20, **options)
    for out in outs:
        data = raw(out)
        assert data.decode("utf-8") == data.decode("utf-8", errors="strict")
        chars = [s for s in out.trace if not s.get("end")]
        assert len(chars) <= 20 and all(len(bytes.fromhex(s["piece_bytes"]).decode()) == 1 for s in chars)
        assert set(out.stats) >= {"steps", "fastpath_share", "forward_passes", "cache_crops", "agreement_rate"}
        for s in out.trace:
            assert set(s) >= {"piece", "ids", "logprob", "origin", "p", "score", "top", "covers", "fastpath"}
            assert s["top"] and all(a[1] >= b[1] for a, b in zip(s["top"], s["top"][1:]))


def test_fast_path_fires_and_changes_nothing():
    """Certified early choices are the argmax of the fully scored rule (exactly so without pruning:
    with pruning, the two orders of scoring prune slightly different covers)."""
    sp, bpe = toy_model("sp", sharpness=4.0), toy_model("bpe", seed=4, sharpness=4.0)  # peaky: certifiable
    sources = ["ab", "aい", "b a", "あ"]
    fast = charwise([sp, bpe], sources, **EXACT_OPTIONS)
    slow = charwise([sp, bpe], sources, fast_path=False, **EXACT_OPTIONS)
    assert [raw(o) for o in fast] == [raw(o) for o in slow]
    assert sum(o.stats["fastpath_share"] for o in fast) > 0 and all(o.stats["fastpath_share"] == 0 for o in slow)
    assert all(o.stats["resolved_share"] < 1 for o in fast) and all(o.stats["resolved_share"] == 1 for o in slow)
    for f, s in zip(fast, slow):
        for a, b in zip(f.trace, s.trace):
            if not a["resolved"]:  # lower bounds of the probabilities the slow path computes
                assert all(a["p"][n] <= b["p"][n] + 1e-6 for n in a["p"]) and a["top"][0][0] == b["top"][0][0]
            if a["fastpath"]:
                assert all(p > 0.5 for p in a["p"].values())


def test_config_mistakes_are_user_errors():
    from decoding.errors import FusemtError

    for bad in ({"rule": "max"}, {"covers": "some"}, {"weights": [1.0]}, {"beam_size": -1}):
        with pytest.raises(FusemtError):
            charwise([toy_model("sp"), toy_model("bpe")], ["a"], **bad)


# --- the embedded pair (slow, short) --------------------------------------------------------------------

SOURCES = ["The weather is nice today.", "Where is the train station?"]


def decode(*overrides):
    from decoding.model import load_model

    run = compose_run(*overrides)
    models = [load_model(spec) for spec in run.models]
    return decoder_class(run.decoding_name)(run.decoding, models, run.prompt).decode(SOURCES)


@pytest.mark.slow
def test_one_hot_weights_on_the_pair_equal_gemma_with_itself():
    common = ("decoding=charwise", "decoding.max_new_tokens=16")
    fused = decode("models=gemma3_smollm2", "decoding.weights=[1,0]", *common)
    itself = decode("models=pair", "models.members=[gemma3_270m,gemma3_270m]", *common)
    assert [o.text for o in fused] == [o.text for o in itself]
    assert all(o.text for o in fused)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["mixture", "product"])
def test_pair_runs_one_step_per_character(rule):
    outs = decode("models=gemma3_smollm2", "decoding=charwise", f"decoding.rule={rule}", "decoding.max_new_tokens=12")
    for out in outs:
        assert out.text and "\ufffd" not in out.text
        chars = [s for s in out.trace if not s.get("end") and "stop" not in s]
        assert all(len(bytes.fromhex(s["piece_bytes"]).decode()) == 1 for s in chars)
        assert out.stats["forward_passes"]["gemma3_270m"] > 0 and out.stats["forward_passes"]["smollm2_135m"] > 0


# --- unite with lookup=exact -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_exact_prefix_probs_from_a_stream_leave_it_unchanged(kind):
    from decoding.charprob import exact_prefix_probs

    model = toy_model(kind)
    prompts = [model.tokenizer(s)["input_ids"] for s in ["ab", "aい b"]]
    stream = ModelStream(model, prompts)
    logprobs = stream.logprobs()
    queries = [(0, "あい".encode()), (1, b" a"), (1, "い".encode()[:2]), (0, b"x")]
    probs = exact_prefix_probs(stream, logprobs, queries, CoverConfig(beam_size=0, prune_threshold=0.0))
    for (row, data), p in zip(queries, probs):
        assert close(p, brute_prefix_prob(model, tuple(prompts[row]), data))
    assert stream.tokens == prompts
    stream.append(0, [model.tokenizer.convert_tokens_to_ids("a")])
    stream.append(1, [model.tokenizer.convert_tokens_to_ids("b")])
    after = stream.logprobs()
    for row, prompt in enumerate(prompts):
        context = tuple(prompt) + (int(stream.tokens[row][-1]),)
        assert torch.allclose(after[row], model.model(torch.tensor([context]), torch.ones(1, len(context)),
                                                      None).logits[0, -1].log_softmax(-1))


def test_unite_exact_lookup_scores_candidates_by_their_prefix_probability(monkeypatch):
    import decoding.methods.unite as unite

    monkeypatch.setattr(unite, "CoverConfig", lambda: EXACT)
    sp, bpe = toy_model("sp", sharpness=2.0), toy_model("bpe", seed=2, sharpness=2.0)
    decoder = unite.UniteDecoder(unite.UniteDecoder.Config(name="unite", top_k=3, lookup="exact"), [sp, bpe],
                                 TOY_PROMPT)
    seen, look_up = [], decoder._rescore_lookups

    def spy(candidates, logprobs, streams):
        contexts = [[tuple(stream.tokens[r]) for r in range(stream.rows)] for stream in streams]
        look_up(candidates, logprobs, streams)
        seen.append((contexts, candidates))

    decoder._rescore_lookups = spy
    state = decoder.prepare(["ab", "aい"])
    for _ in range(4):
        decoder.step(state)
    checked = 0
    for contexts, candidates in seen:
        for row, cands in enumerate(candidates):
            for cand in cands:
                for m, model in enumerate((sp, bpe)):
                    if not cand.proposed[m] and cand.key is not None:
                        assert close(cand.probs[m], brute_prefix_prob(model, contexts[m][row], cand.key))
                        checked += 1
    assert checked > 10 and unite.UniteDecoder.Config().lookup == "first_token"


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_covers_are_the_members_own_encoding_at_every_step(kind):
    """covers=canonical: every cover's complete tokens are the member's own tokenizer's encoding of their bytes."""
    model = toy_model(kind, sharpness=1.0)
    decoder = CharwiseDecoder(CharwiseDecoder.Config(name="charwise", max_new_tokens=10, max_repeats=0,
                                                     covers="canonical"), [model, model], TOY_PROMPT)
    state, checked = decoder.prepare(["ab", "aい", "b a"]), 0
    while decoder.step(state):
        for member in state.members:
            for seq in state.active:
                beam = member.beams[seq]
                for node in beam.hypotheses():
                    spelled = bytes(beam.text[:node.start])
                    if utf8_pending(spelled):  # a cover ending inside a character is judged once it completes
                        continue
                    assert node.path == member.canonical_path(spelled)
                    checked += 1
    assert checked > 0


@pytest.mark.slow
def test_cache_equals_recompute_beyond_the_sliding_window():
    """Gemma 3's local layers see 512 tokens: rows duplicated, rolled back and padded by the cover
    beams must still see exactly their own last 512 tokens (prompt of ~600 tokens)."""
    from decoding.model import load_model

    run = compose_run("models=gemma3_270m", "decoding=charwise", "decoding.max_new_tokens=6")
    gemma = load_model(run.models[0])
    source = " ".join(["The weather is nice today, and the company will open a new office in Tokyo."] * 30)
    assert render_prompt(gemma, [source], run.prompt)["input_ids"].shape[1] > 512  # the prompt the model sees
    outs = [decoder_class("charwise")(dataclasses.replace(run.decoding, use_cache=cache), [gemma], run.prompt)
            .decode([source])[0] for cache in (True, False)]
    assert raw(outs[0]) == raw(outs[1])
    for a, b in zip(outs[0].trace, outs[1].trace):
        assert all(abs(a["p"][n] - b["p"][n]) < 1e-3 for n in a["p"])


def brute_argmax(model, source, text: bytes):
    """The model's most likely next character (None: the end) after ``text``, by brute force."""
    ids = model.tokenizer(source)["input_ids"]
    anchor, prefix = split_anchor(model.vocab, ids, 1)
    scores = {c.encode(): brute_prefix_prob(model, tuple(anchor), prefix + text + c.encode()) for c in TOY_CHARS}
    best = max(sorted(scores), key=lambda c: scores[c])
    return None if brute_end_prob(model, tuple(anchor), prefix + text) > scores[best] else best


def test_reference_argmax_is_each_members_exact_next_character_along_the_reference():
    """Teacher forcing (fusemt-compat's agreement): at every reference position, each member's top
    character equals brute force over all its tokenizations."""
    members = [toy_model("sp", sharpness=3.0), toy_model("bpe", seed=3, sharpness=3.0)]
    sources, references = ["ab", "b"], ["aあい", "b a"]
    decoder = CharwiseDecoder(CharwiseDecoder.Config(name="charwise", fast_path=False, beam_size=0,
                                                     prune_threshold=0.0),
                              members, TOY_PROMPT)
    tops = decoder.reference_argmax(sources, references)
    for seq, (source, reference) in enumerate(zip(sources, references)):
        assert len(tops[seq]) == len(reference) + 1
        for pos in range(len(reference) + 1):
            text = reference[:pos].encode()
            assert tops[seq][pos] == [brute_argmax(m, source, text) for m in members], (seq, pos)
    with pytest.raises(ValueError, match="fast_path"):
        CharwiseDecoder(CharwiseDecoder.Config(name="charwise"), members, TOY_PROMPT).reference_argmax(["a"], ["a"])


def test_a_member_that_gave_the_mixtures_choice_no_probability_goes_on_from_its_own_encoding():
    """Mixture (0.6, 0.4): A is sure of "x", B of "y"; "x" wins and B has no cover of it. B restarts
    from its own encoding of the text and keeps scoring (it used to leave an empty beam and crash)."""
    a, b = toy_model("sp", name="a"), toy_model("sp", seed=5, name="b")
    bos = a.tokenizer.bos_token_id
    x = a.tokenizer.convert_tokens_to_ids("x")
    script(a, [bos], {"x": 1.0})
    script(b, [bos], {"y": 1.0})
    script(b, [bos, x], {"a": 0.9, "</s>": 0.1})
    script(a, [bos, x], {"a": 0.5, "b": 0.5})
    (out,) = charwise([a, b], [""], rule="mixture", weights=[0.6, 0.4], **EXACT_OPTIONS)
    assert out.text.startswith("xa") and out.stats["restarts"] == {"a": 0, "b": 1}
    first, second = out.trace[0], out.trace[1]
    assert first["p"] == {"a": 1.0, "b": 0.0} and second["p"]["b"] == pytest.approx(0.9)
