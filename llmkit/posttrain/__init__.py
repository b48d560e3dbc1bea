"""Post-training: chat templates and loss masks, SFT and preference data, LoRA (DESIGN.md section 8)."""
