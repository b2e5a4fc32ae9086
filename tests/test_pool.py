"""decoding=pool: candidate pools, MBR / likelihood / model_mbr / oracle selection, runs as candidates.

Brute-force references: sacrebleu's sentence chrF and BLEU against hand-computed n-gram statistics;
MBR selection against a loop over the unmerged candidate list; each member's likelihood against a
plain unpadded forward pass; mbrs.DecoderMBR where mbrs is installed (its pins do not co-install
with transformers 5, so it usually is not).
"""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, build_decoder
from tiny_models import tiny_gemma3, tiny_llama

from decoding.errors import FusemtError
from decoding.mbr import PairwiseUtility, argmax_first, build_pool
from decoding.prefix import PromptCache
from decoding.prompt import FewShotExample, PromptConfig
from decoding.rescore import continuation, prompt_ids, sequence_logprobs

FIXTURE = ["今日は天気がいいです。", "今日はいい天気です。", "今日は天気がいいです。", "本日は晴天なり。",
           "今日の天気は良いです。", "今日はいい天気です。", "今日は天気がいいです。", "天気"]


def brute_chrf(hyp: str, ref: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF2 (sacrebleu's definition: whitespace removed, effective-order averaging of precision/recall)."""
    hyp, ref = "".join(hyp.split()), "".join(ref.split())
    precs, recs = [], []
    for n in range(1, order + 1):
        h = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        if h and r:
            match = sum((h & r).values())
            precs.append(match / sum(h.values()))
            recs.append(match / sum(r.values()))
    if not precs:
        return 0.0
    p, r = sum(precs) / len(precs), sum(recs) / len(recs)
    return 100 * (1 + beta**2) * p * r / (beta**2 * p + r) if p + r else 0.0


def brute_bleu(hyp: str, ref: str) -> float:
    """Sentence BLEU with effective order over sacrebleu's ja-mecab tokens (the tokenizer is the library's)."""
    from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab

    tok = TokenizerJaMecab()
    h, r = tok(hyp).split(), tok(ref).split()
    logs, matched, smooth = [], False, 1.0
    for n in range(1, 5):
        hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
        rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        if not hc:
            break
        match = sum((hc & rc).values())
        matched = matched or match > 0
        if match == 0:  # sacrebleu's default 'exp' smoothing: 1 / (2^k * total) for the k-th order without a match
            smooth *= 2
            logs.append(math.log(1 / (smooth * sum(hc.values()))))
        else:
            logs.append(math.log(match / sum(hc.values())))
    if not matched:
        return 0.0
    bp = 1.0 if len(h) > len(r) else math.exp(1 - len(r) / len(h))
    return 100 * bp * math.exp(sum(logs) / len(logs))


def test_sacrebleu_sentence_scores_equal_brute_force():
    utility = PairwiseUtility("chrf")
    for hyp in FIXTURE:
        for ref in FIXTURE:
            assert utility.chrf.sentence_score(hyp, [ref]).score == pytest.approx(brute_chrf(hyp, ref), abs=1e-9)
            assert utility.bleu.sentence_score(hyp, [ref]).score == pytest.approx(brute_bleu(hyp, ref), abs=1e-9)


def brute_mbr(texts: list[str], include_self: bool, metric) -> tuple[int, list[float]]:
    """Expected utility of every position of the unmerged list; the winner's first position."""
    n = len(texts)
    expected = []
    for i in range(n):
        refs = [j for j in range(n) if include_self or j != i]
        expected.append(sum(metric(texts[i], texts[j]) for j in refs) / len(refs))
    best = max(expected)
    return expected.index(best), expected


def pool_decoder(**options):
    options.setdefault("generate", [])
    options.setdefault("runs", ["fixture"])
    return build_decoder("pool", [], **options)


def choose(texts: list[str], reference: str | None = None, **options):
    """Run decoding=pool over one segment whose pool is ``texts`` (as outputs of one finished run)."""
    decoder = pool_decoder(**options)
    decoder.external = {"s": [(f"run:sys{k}", t) for k, t in enumerate(texts)]}
    return decoder.decode(["source"], segments=[SimpleNamespace(id="s", reference=reference)])[0]


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("utility", ["chrf", "bleu"])
def test_mbr_equals_brute_force_over_the_unmerged_list(include_self, utility):
    metric = brute_chrf if utility == "chrf" else brute_bleu
    want, expected = brute_mbr(FIXTURE, include_self, metric)
    out = choose(FIXTURE, utility=utility, include_self=include_self)
    assert out.text == FIXTURE[want]
    by_text = {c["text"]: c for c in out.pool}
    assert [c["text"] for c in out.pool] == list(dict.fromkeys(FIXTURE))  # merged, in order of first appearance
    assert by_text["今日は天気がいいです。"]["count"] == 3
    assert by_text["今日は天気がいいです。"]["origins"] == {"run:sys0": 1, "run:sys2": 1, "run:sys6": 1}
    for text, value in zip(FIXTURE, expected):
        assert by_text[text]["utility"] == pytest.approx(value, abs=1e-5)


def test_weighted_sum_utility_is_the_weighted_sum():
    chrf, bleu = choose(FIXTURE, utility="chrf").pool, choose(FIXTURE, utility="bleu").pool
    mixed = choose(FIXTURE, utility="chrf:0.25+bleu:0.75").pool
    for c, b, m in zip(chrf, bleu, mixed):
        assert m["utility"] == pytest.approx(0.25 * c["utility"] + 0.75 * b["utility"], abs=1e-5)


def test_ties_go_to_the_candidate_that_entered_the_pool_first():
    # Two candidates that score each other alike: symmetric utility, the first listed wins.
    assert choose(["ab", "ba"]).text == "ab"
    assert choose(["ba", "ab"]).text == "ba"
    assert argmax_first([1.0, 3.0, 3.0]) == 1


def test_one_candidate_pool_returns_it():
    for select in ("mbr", "oracle"):
        out = choose(["唯一の候補"], reference="参照", select=select)
        assert out.text == "唯一の候補" and len(out.pool) == 1 and out.pool[0]["chosen"]


def test_oracle_picks_best_chrf_against_reference_and_says_it_is_an_upper_bound():
    reference = "今日はいい天気ですね。"
    out = choose(FIXTURE, reference=reference, select="oracle")
    assert out.text == max(dict.fromkeys(FIXTURE), key=lambda t: brute_chrf(t, reference))
    assert any("upper bound" in w for w in out.warnings)
    with pytest.raises(FusemtError, match="needs references"):
        choose(FIXTURE, reference=None, select="oracle")


def test_pool_merges_duplicates_keeping_origins_and_counts():
    pool = build_pool([("a:greedy", "x"), ("b:greedy", "y"), ("a:samples:4", "x"), ("a:samples:4", "x")])
    assert [(c.text, c.origins, c.count) for c in pool] == [("x", {"a:greedy": 1, "a:samples:4": 2}, 3),
                                                           ("y", {"b:greedy": 1}, 1)]


def test_mbr_equals_mbrs_decoder():
    mbrs = pytest.importorskip("mbrs")  # not installed by default: its pins (transformers < 5) clash with the stack
    from mbrs.decoders import DecoderMBR
    from mbrs.metrics import MetricChrF

    metric = MetricChrF(MetricChrF.Config())
    result = DecoderMBR(DecoderMBR.Config(), metric).decode(FIXTURE, FIXTURE, nbest=1)
    assert mbrs is not None and choose(FIXTURE, include_self=True).text == result.sentence[0]


# Likelihood: each member scores every candidate in its own tokenization.

def plain_forward_logprob(model, prompt: PromptConfig, source: str, text: str) -> float:
    """Sum of the candidate's token log-probabilities from one unpadded forward pass (+ the end)."""
    head = prompt_ids(model, [source], prompt)[0]
    cont = continuation(model, text, prompt)
    ids = torch.tensor([head + cont.ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model.model(input_ids=ids).logits.float(), dim=-1)[0]
    total = sum(float(logprobs[len(head) - 1 + t, tid]) for t, tid in enumerate(cont.ids))
    if cont.score_end:
        total += float(torch.logsumexp(logprobs[-1, model.end_ids], dim=-1))
    return total


def check_likelihoods(models, prompt: PromptConfig, sources: list[str], texts: list[list[str]]):
    for model in models:
        got, passes = sequence_logprobs(model, prompt, sources, texts)
        assert passes >= 1
        for s, group in enumerate(texts):
            for k, text in enumerate(group):
                assert got[s][k] == pytest.approx(plain_forward_logprob(model, prompt, sources[s], text), abs=2e-3)


TEXTS = [["今日は天気がいいです。", "天気", "", "The weather is nice today."],
         ["メールを送ってください。", "ルールを守る"]]


@pytest.mark.parametrize("chat", [False, True])
def test_likelihood_equals_plain_forward_pass_on_tiny_models(chat):
    models = [tiny_gemma3(), tiny_llama()]
    if chat:  # the chat path: the text, then the summed probability of the end tokens
        for m in models:
            m.tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}\n{% endfor %}A:"
    try:
        check_likelihoods(models, PromptConfig(), ["The weather is nice.", "Please send the mail."], TEXTS)
    finally:
        for m in models:
            m.tokenizer.chat_template = None


def test_likelihood_on_the_shared_prompt_prefix_equals_plain_forward_pass():
    """With the run's prompt cache (few-shot examples several of Gemma 3's sliding windows long), each
    source's prompt runs on top of the cached prefix: the scores stay those of a plain forward pass."""
    models = [tiny_gemma3(), tiny_llama()]
    prompt = PromptConfig(examples=[FewShotExample("The weather is nice today.", "今日は天気がいいです。"),
                                    FewShotExample("Good morning.", "メールを送ってください。")])
    for model in models:
        model.prompt_cache = PromptCache(model)
    try:
        check_likelihoods(models, prompt, ["The weather is nice.", "Please send the mail."], TEXTS)
        assert all(m.prompt_cache.prefix_passes == 1 and len(m.prompt_cache.head) > 16 for m in models)
    finally:
        for model in models:
            model.prompt_cache = None


def test_a_members_likelihood_does_not_depend_on_the_other_members():
    gemma, llama = tiny_gemma3(), tiny_llama()
    prompt, sources = PromptConfig(), ["The weather is nice.", "Please send the mail."]
    alone = build_decoder("pool", [gemma], prompt, generate=["greedy"], select="likelihood")
    both = build_decoder("pool", [gemma, llama], prompt, generate=["greedy"], select="likelihood")
    torch.manual_seed(0)
    out_alone = alone.decode(sources)
    torch.manual_seed(0)
    out_both = both.decode(sources)
    for a, b in zip(out_alone, out_both):
        a_lp = {c["text"]: c["logprob"]["tiny_gemma3"] for c in a.pool}
        b_lp = {c["text"]: c["logprob"]["tiny_gemma3"] for c in b.pool}
        assert all(b_lp[t] == pytest.approx(v, abs=1e-4) for t, v in a_lp.items())
        # the joint score is the weighted per-character mean of the members' log-likelihoods
        for c in b.pool:
            want = sum(0.5 * c["logprob"][m] / (len(c["text"]) + 1) for m in ("tiny_gemma3", "tiny_llama"))
            assert c["joint"] == pytest.approx(want, abs=1e-5)
        chosen = max(b.pool, key=lambda c: c["joint"])
        assert b.text == chosen["text"]


def test_generations_enter_the_pool_with_their_origins():
    model = tiny_llama()
    sources = ["The weather is nice.", "Please send the mail."]
    decoder = build_decoder("pool", [model], PromptConfig(), generate=["greedy", "beam:2", "samples:3"],
                            max_new_tokens=6)
    outs = decoder.decode(sources)
    greedy = build_decoder("greedy", [model], PromptConfig(), max_new_tokens=6).decode(sources)
    for out, g in zip(outs, greedy):
        assert sum(c["count"] for c in out.pool) == 1 + 2 + 3
        origins = Counter()
        for c in out.pool:
            origins.update(c["origins"])
        assert origins == {"tiny_llama:greedy": 1, "tiny_llama:beam:2": 2, "tiny_llama:samples:3": 3}
        assert any(c["text"] == g.text and "tiny_llama:greedy" in c["origins"] for c in out.pool)
        assert out.stats["candidates"] == len(out.pool)


def test_samples_do_not_depend_on_batching_or_the_prompt_cache():
    """Each source's samples come from a generator seeded from (seed, source): the same at batch 1 and 3,
    with the shared prompt prefix's cache (whose rows generate repeats per returned sequence), and
    different under another seed."""
    model = tiny_llama()
    sources = ["The weather is nice.", "Please send the mail.", "Where is the station?"]

    def samples(batch: int, cache: bool, seed: int = 0) -> list:
        model.prompt_cache = PromptCache(model) if cache else None
        decoder = build_decoder("pool", [model], PromptConfig(), generate=["samples:3"], max_new_tokens=6, seed=seed,
                                epsilon_cutoff=0.0, temperature=3.0)
        outs = [o for i in range(0, len(sources), batch) for o in decoder.decode(sources[i:i + batch])]
        return [sorted((c["text"], c["count"]) for c in o.pool) for o in outs]

    try:
        alone = samples(1, cache=False)
        assert samples(3, cache=False) == alone
        assert samples(3, cache=True) == alone
        assert samples(1, cache=False, seed=7) != alone
    finally:
        model.prompt_cache = None


def test_model_mbr_weights_pseudo_references_by_the_joint_score():
    model = tiny_llama()
    decoder = build_decoder("pool", [model], PromptConfig(), generate=["beam:3"], select="model_mbr", max_new_tokens=5)
    out = decoder.decode(["The weather is nice."])[0]
    texts = [c["text"] for c in out.pool]
    weights = torch.softmax(torch.tensor([c["joint"] for c in out.pool], dtype=torch.float64), 0).tolist()
    expected = []
    for i, t in enumerate(texts):
        pairs = [(weights[j], brute_chrf(t, texts[j])) for j in range(len(texts)) if j != i]
        mass = sum(w for w, _ in pairs)
        expected.append(sum(w * u for w, u in pairs) / mass if mass else 0.0)
    assert [c["utility"] for c in out.pool] == pytest.approx(expected, abs=1e-4)
    assert out.text == texts[expected.index(max(expected))]


# Bad inputs: one line, exit 2, before any model loads (the member below does not exist: loading it
# would fail with another message).

GHOST = "models.members=[{name: ghost, path: /nonexistent/ghost-model}]"


def run_cli(tmp_path, *overrides):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    argv = [sys.executable, "-m", "runners.translate", *overrides, f"paths.results_dir={tmp_path}/results",
            f"paths.output_dir={tmp_path}/outputs", "logger=none", "metrics.comet=false"]
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("fusemt: error: "), proc.stderr[-2000:]
    return lines[0]


def results_of_another_dataset(tmp_path) -> str:
    path = tmp_path / "other.jsonl"
    rows = [{"id": f"sample-{i:03d}", "source": f"another text {i}", "hypothesis": "別"} for i in range(50)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def results_missing_segments(tmp_path) -> str:
    path = tmp_path / "partial.jsonl"
    path.write_text(json.dumps({"id": "nope", "source": "x", "hypothesis": "y"}) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("runs, extra, fragment", [
    (lambda t: "/missing/run.txt", [], "is neither a file nor a run"),
    (lambda t: str(t / "short.txt"), [], "lines but dataset 'sample_en_ja' has"),
    (results_of_another_dataset, [], "another dataset"),
    (results_missing_segments, [], "has no output for"),
    (lambda t: None, ["decoding.utility=comet"], "not a local COMET checkpoint"),
    (lambda t: None, ["decoding.generate=[]"], "empty pool"),
    (lambda t: None, ["decoding.generate=[beam:0]"], "is not greedy, beam:K or samples:N"),
    (lambda t: None, ["decoding.select=vote"], "decoding.select='vote'"),
], ids=["runs-file-missing", "runs-misaligned", "runs-other-dataset", "runs-missing-segments", "comet-without-model",
        "empty-pool", "beam-0", "unknown-rule"])
def test_bad_pool_input_gives_one_line_before_any_model_loads(tmp_path, runs, extra, fragment):
    (tmp_path / "short.txt").write_text("一行だけ\n", encoding="utf-8")
    run = runs(tmp_path)
    overrides = ["decoding=pool", GHOST, "dataset.limit=3", *extra] + ([f"decoding.runs=[{run}]"] if run else [])
    assert fragment in one_line_error(run_cli(tmp_path, *overrides))


def test_system_combination_runs_without_models(tmp_path):
    """decoding.generate=[] over plain hypothesis files aligned by dataset row: no model is loaded."""
    data = tmp_path / "data.jsonl"
    rows = [{"id": 0, "domain": "canary", "doc_id": "canary", "source": "CANARY", "reference": "CANARY"},
            {"id": 1, "source": "Good morning.", "reference": "おはようございます。"},
            {"id": 2, "source": "Thank you.", "reference": "ありがとうございます。"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    systems = {"a": ["canary", "おはようございます。", "ありがとう。"],
               "b": ["canary", "おはよう。", "ありがとうございます。"],
               "c": ["canary", "おはようございます", "どうもありがとうございます。"]}
    for name, lines in systems.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    runs = ",".join(str(tmp_path / f"{n}.txt") for n in systems)
    proc = run_cli(tmp_path, "decoding=pool", GHOST, "decoding.generate=[]", f"decoding.runs=[{runs}]",
                   f"dataset.path={data}", "run_name=combo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = [json.loads(line)
           for line in (tmp_path / "results" / "sample" / "ensemble" / "combo.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == ["1", "2"] and all(r["models"] == [] for r in out)
    for r in out:
        assert {o for c in r["pool"] for o in c["origins"]} == {"run:a", "run:b", "run:c"}
        assert r["hypothesis"] == max(r["pool"], key=lambda c: c["utility"])["text"]
    metrics = json.loads((tmp_path / "results" / "sample" / "ensemble" / "combo.metrics.json").read_text())
    assert sum(metrics["pool_choice_share"].values()) >= 1 and metrics["pool_oracle_chrf"] >= metrics["chrf"]
    page = (tmp_path / "results" / "sample" / "ensemble" / "combo.trace.html").read_text()
    assert "ranked by the rule" in page and "▶" in page

    # A pool run as decoding.runs gives its whole pool, counts and origins kept (under its own): the same choice.
    again = run_cli(tmp_path, "decoding=pool", GHOST, "decoding.generate=[]", "decoding.runs=[combo]",
                    f"dataset.path={data}", "run_name=again")
    assert again.returncode == 0, again.stderr[-2000:]
    rerun = [json.loads(line)
             for line in (tmp_path / "results" / "sample" / "ensemble" / "again.jsonl").read_text().splitlines()]
    for first, second in zip(out, rerun):
        assert second["hypothesis"] == first["hypothesis"]
        assert [(c["text"], c["count"], c["utility"]) for c in second["pool"]] == \
            [(c["text"], c["count"], c["utility"]) for c in first["pool"]]
        assert [c["origins"] for c in second["pool"]] == \
            [{f"run:combo/{o}": n for o, n in c["origins"].items()} for c in first["pool"]]


@pytest.mark.slow
def test_likelihood_on_the_embedded_models_equals_a_plain_forward_pass():
    """Gemma 3 270M (plain few-shot template: leading space, line end) and SmolLM2 (chat template: end
    tokens) each score the same candidates in their own tokenization, batched as in a run; the same
    on top of the run's cached shared prompt prefix."""
    from conftest import compose_run

    from decoding.model import load_model

    run = compose_run("models=gemma3_smollm2", "decoding=pool")
    models = [load_model(spec) for spec in run.models]
    texts = [["今日は天気がいいです。", "天気", "The weather is nice."], ["メールを送ってください。"]]
    sources = ["The weather is nice today.", "Please send me the mail."]
    check_likelihoods(models, run.prompt, sources, texts)
    for model in models:
        model.prompt_cache = PromptCache(model)
    try:
        check_likelihoods(models, run.prompt, sources, texts)
        assert all(m.prompt_cache.prefix_passes == 1 for m in models)
    finally:
        for model in models:
            model.prompt_cache = None
    decoder = build_decoder("pool", models, run.prompt, generate=["greedy"], select="likelihood", max_new_tokens=24)
    out = decoder.decode(["The weather is nice today."])[0]
    assert {o for c in out.pool for o in c["origins"]} == {"gemma3_270m:greedy", "smollm2_135m:greedy"}
    assert out.text == max(out.pool, key=lambda c: c["joint"])["text"]
