"""The LoRA engine: adapters on any PyTorch model, switched, merged, mixed per sample, saved in PEFT's format."""
