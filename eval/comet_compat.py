"""unbabel-comet 2.2.7 under transformers 5: two small fixes, applied before loading a checkpoint.

unbabel-comet pins transformers<5, so it is installed with ``--no-deps`` next to our stack
(Makefile step 2). Its inference then breaks in two places (upstream: Unbabel/COMET #262, #271):

1. Its encoders unpack ``self.model(..., return_dict=False)`` into three values, but transformers
   5 leaves the ``None`` pooler output out of that tuple ("not enough values to unpack"). The
   patched forwards ask for a ``ModelOutput`` and read its fields by name; the tensors are the same.
2. UnifiedMetric models (CometKiwi, XCOMET) call ``tokenizer.build_inputs_with_special_tokens``,
   which transformers 5 removed from fast tokenizers. It is restored with the layout those
   tokenizers always produced: XLM-R ``<s> A </s></s> B </s>``, BERT ``[CLS] A [SEP] B [SEP]``.

Neither fix changes a score: the same tensors and token ids reach the same model.
"""

from __future__ import annotations

_APPLIED = False


def _bert_forward(self, input_ids, attention_mask, token_type_ids=None, **kwargs):
    out = self.model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                     output_hidden_states=True, return_dict=True)
    return {"sentemb": out.pooler_output, "wordemb": out.last_hidden_state, "all_layers": out.hidden_states,
            "attention_mask": attention_mask}


def _xlmr_forward(self, input_ids, attention_mask, **kwargs):
    out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True)
    return {"sentemb": out.last_hidden_state[:, 0, :], "wordemb": out.last_hidden_state,
            "all_layers": out.hidden_states, "attention_mask": attention_mask}


def _pair_builder(separator_tokens: int):
    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        cls, sep = [self.cls_token_id], [self.sep_token_id]
        if token_ids_1 is None:
            return cls + list(token_ids_0) + sep
        return cls + list(token_ids_0) + sep * separator_tokens + list(token_ids_1) + sep

    return build_inputs_with_special_tokens


def apply() -> None:
    """Patch comet's encoders and the tokenizers it uses (idempotent; no-op where not needed)."""
    global _APPLIED
    if _APPLIED:
        return
    from comet.encoders.bert import BERTEncoder
    from comet.encoders.xlmr import XLMREncoder
    from transformers import BertTokenizerFast, XLMRobertaTokenizerFast

    BERTEncoder.forward = _bert_forward
    XLMREncoder.forward = _xlmr_forward  # also MiniLM, RemBERT and XLM-R XL, which inherit it
    for tokenizer_cls, separators in ((XLMRobertaTokenizerFast, 2), (BertTokenizerFast, 1)):
        if not hasattr(tokenizer_cls, "build_inputs_with_special_tokens"):
            tokenizer_cls.build_inputs_with_special_tokens = _pair_builder(separators)
    _APPLIED = True
