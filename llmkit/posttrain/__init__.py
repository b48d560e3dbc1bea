"""Post-training: SFT and preference data, objectives (sft, dpo, reward), PEFT export. Chat templates live in
llmkit/text/chat.py and LoRA layers in llmkit/adapters/lora.py: inference uses them too."""
