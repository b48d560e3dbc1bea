"""Text in and out of token ids: tokenizers (char-level, sentencepiece, Hugging Face tokenizer.json) and chat
templates. Everything that reads or writes text imports from here: checkpoint loading, data preparation,
generation, serving, post-training, benchmarks, the exporter. Nothing here imports a training package."""
