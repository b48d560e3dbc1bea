"""llmkit export ckpt=... out=...: a checkpoint as a Hugging Face directory."""

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, require


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    require(cfg, "ckpt", "outputs/<run>/checkpoints/last.ckpt")
    require(cfg, "out", "hf_model/")
    from llmkit.checkpoint import load_checkpoint
    from llmkit.hf import ExportError, export_hf

    if cfg.adapter:
        export_adapter(cfg)
        return
    if cfg.format not in ("hf", "onnx"):
        raise SystemExit(f"format={cfg.format}: use format=hf (a Hugging Face directory) or format=onnx (ONNX Runtime)")
    loaded = load_checkpoint(cfg.ckpt)
    try:
        if cfg.format == "onnx":
            from llmkit.onnx import export_onnx

            out = export_onnx(loaded.model, loaded.tokenizer, cfg.out, cfg.quantize, loaded.checkpoint.get("chat_template"))
        else:
            out = export_hf(loaded.model, loaded.tokenizer, cfg.out)
    except (ExportError, ValueError) as err:
        raise SystemExit(str(err)) from None
    print(f"exported {cfg.ckpt} (step {loaded.step}) to {out}")


def export_adapter(cfg: DictConfig) -> None:
    """A LoRA run's adapters alone, in PEFT's format (adapter_config.json + adapter_model.safetensors). A QLoRA
    run's adapters are the same tensors; peft puts them on the full-precision base (export it from init_from),
    which differs from the quantized base they were trained over by the quantization error."""
    import torch

    from llmkit.checkpoint import adapted_from_checkpoint, tokenizer_state
    from llmkit.hf import ExportError
    from llmkit.posttrain.peft_format import save_peft_adapter
    from llmkit.text.tokenizer import tokenizer_from_state

    checkpoint = torch.load(cfg.ckpt, map_location="cpu", weights_only=True)
    if "lora" not in checkpoint:
        raise SystemExit(f"{cfg.ckpt} is not a LoRA checkpoint (finetune=lora or qlora): export the whole model "
                         "without adapter=true")
    state = tokenizer_state(checkpoint)
    tokenizer = tokenizer_from_state(state) if state else None
    try:
        out = save_peft_adapter(adapted_from_checkpoint(checkpoint), tokenizer, cfg.out, cfg.base)
    except ExportError as err:
        raise SystemExit(str(err)) from None
    print(f"exported the LoRA adapters of {cfg.ckpt} to {out} (load with peft.PeftModel.from_pretrained on the base)")
