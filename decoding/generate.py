"""Single-model decoding through Hugging Face ``generate`` (greedy and beam share this base)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from decoding.base import DecodeOutput, Decoder, own_choice_meaning, trace_step, traced_output
from decoding.prefix import prefilled_cache
from decoding.prompt import render_prompt, stop_strings
from decoding.stats import SingleModelStats


@dataclass
class GenerateState:
    sources: list[str]
    batch: Any
    outputs: list[DecodeOutput] = field(default_factory=list)


class StopOnBytes(StoppingCriteria):
    """Stops a row once its new text contains a stop string, comparing raw token bytes.

    HF's ``stop_strings`` builds tables over the whole vocabulary on every call (seconds for a
    262k vocabulary); stop strings are few and short, so scanning each row's tail is cheaper.
    """

    def __init__(self, vocab, stops: list[str], prompt_len: int, min_new_tokens: int = 0):
        self.vocab, self.prompt_len, self.min_new_tokens = vocab, prompt_len, min_new_tokens
        self.stops = [s.encode("utf-8") for s in stops if s]
        self.longest = max(map(len, self.stops), default=0)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = []
        if input_ids.shape[1] - self.prompt_len < self.min_new_tokens:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in input_ids[:, self.prompt_len:].tolist():
            tail, i = b"", len(row)
            while i > 0 and len(tail) < self.longest + self.vocab.max_token_bytes:
                i -= 1
                tail = (self.vocab.token_bytes[row[i]] or b"") + tail
            done.append(any(s in tail for s in self.stops))
        return torch.tensor(done, device=input_ids.device)


class GenerateDecoder(Decoder):
    """Runs ``model.generate`` once for the whole batch; subclasses choose the generation kwargs."""

    min_models = max_models = 1
    Stats = SingleModelStats
    search: ClassVar[str]  # what the trace legend calls the model's choice ("greedy", "beam search")

    @classmethod
    def origin_meaning(cls, origin: str, models: list[str]) -> str:
        return own_choice_meaning(origin, cls.search)

    def generation_kwargs(self) -> dict:
        raise NotImplementedError

    def prepare(self, sources: list[str]) -> GenerateState:
        batch = render_prompt(self.models[0], sources, self.prompt)
        return GenerateState(sources=sources, batch=batch)

    @torch.inference_mode()
    def step(self, state: GenerateState) -> bool:
        model = self.models[0]
        tok = model.tokenizer
        stops = stop_strings(tok, self.prompt, model.spec.stop_strings)
        input_ids = state.batch["input_ids"].to(model.device)
        kwargs = self.generation_kwargs()
        traced = self.traces_steps
        # generate expands every row to max(num_beams, num_return_sequences) rows but never a cache it is given
        repeats = max(kwargs.get("num_beams", 1), kwargs.get("num_return_sequences", 1))
        cache = prefilled_cache(model, state.batch, repeats=repeats) if model.prompt_cache is not None else None
        out = model.model.generate(
            input_ids=input_ids,
            attention_mask=state.batch["attention_mask"].to(model.device),
            max_new_tokens=self.cfg.max_new_tokens,
            min_new_tokens=self.cfg.min_new_tokens or None,
            eos_token_id=model.end_ids,
            pad_token_id=tok.pad_token_id,
            stopping_criteria=StoppingCriteriaList([StopOnBytes(model.vocab, stops, input_ids.shape[1],
                                                                self.cfg.min_new_tokens)]
                                                   if stops else []),
            past_key_values=cache,
            return_dict_in_generate=True,
            output_scores=True,  # its length is the forward passes; the trace's log-probabilities come from it
            **kwargs,
        )
        new = out.sequences[:, input_ids.shape[1]:]
        logprobs = model.model.compute_transition_scores(
            out.sequences, out.scores, getattr(out, "beam_indices", None), normalize_logits=True
        ).tolist() if traced else [[None] * new.shape[1]] * new.shape[0]
        vocab = model.vocab
        per_source = new.shape[0] // input_ids.shape[0]  # num_return_sequences: each source's sequences are adjacent
        for row in range(new.shape[0]):
            steps = []
            for tid, lp in zip(new[row].tolist(), logprobs[row]):
                if tid == tok.pad_token_id and tid not in vocab.end_ids and not vocab.token_bytes[tid]:
                    break  # padding after this sequence finished
                is_end = tid in vocab.end_ids
                steps.append(trace_step(vocab.token_bytes[tid] or b"", ids={model.name: [tid]} if traced else {},
                                        logprob={model.name: lp} if traced else {}, origin=model.name, end=is_end))
                if is_end:
                    break
            warnings = ([f"prompt truncated to {model.spec.max_input_tokens} tokens"]
                        if state.batch["truncated"][row // per_source] else [])
            state.outputs.append(traced_output(steps, stops,
                                               SingleModelStats(forward_passes={model.name: len(out.scores)}),
                                               warnings, self.trace))
        return False

    def finish(self, state: GenerateState) -> list[DecodeOutput]:
        return state.outputs
