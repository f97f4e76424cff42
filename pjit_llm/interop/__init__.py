"""Other formats: safetensors files and Hugging Face checkpoints."""
