"""A tiny COMET checkpoint built offline: a sentencepiece model trained on a few lines, a small
XLM-R config as the local encoder, a RegressionMetric with random weights, saved in the layout
``comet.load_from_checkpoint`` expects (``checkpoints/model.ckpt`` + ``hparams.yaml``)."""

from pathlib import Path

LINES = ["The weather is nice today.", "今日は天気がいいです。", "Where is the station?", "駅はどこですか？",
         "Thank you very much.", "どうもありがとうございます。"]


def build_tiny_comet(folder: Path) -> Path:
    import pytorch_lightning as pl
    import sentencepiece as spm
    import torch
    import yaml
    from transformers import XLMRobertaConfig, XLMRobertaTokenizerFast

    from eval import comet_compat

    encoder = folder / "encoder"
    encoder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(LINES * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(encoder / "sentencepiece.bpe"), vocab_size=120,
                                   model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1,
                                   minloglevel=2, hard_vocab_limit=False)
    # from_pretrained(folder), not the vocab_file= constructor, which ignores the file in transformers 5
    tokenizer = XLMRobertaTokenizerFast.from_pretrained(str(encoder))
    tokenizer.save_pretrained(str(encoder))
    XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=130,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(str(encoder))
    comet_compat.apply()
    from comet.models import RegressionMetric

    torch.manual_seed(0)
    model = RegressionMetric(pretrained_model=str(encoder), load_pretrained_weights=False, hidden_sizes=[16],
                             encoder_model="XLM-RoBERTa", layer="mix", pool="avg", batch_size=4)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", devices=1)
    trainer.strategy.connect(model)
    checkpoint = folder / "checkpoints" / "model.ckpt"
    checkpoint.parent.mkdir(exist_ok=True)
    trainer.save_checkpoint(str(checkpoint))
    (folder / "hparams.yaml").write_text(yaml.safe_dump(dict(model.hparams)))
    return checkpoint
