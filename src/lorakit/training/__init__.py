"""`lorakit finetune`: LoRA fine-tuning of transformers models on local data, resumable, on several processes."""
