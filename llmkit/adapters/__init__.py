"""Adapters over a frozen base: LoRA layers, their state and merging. Checkpoint loading merges adapters with
this package alone, so loading never imports the training code in llmkit/posttrain/."""
