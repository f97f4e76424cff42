"""The Llama family (Llama 2/3, Mistral without sliding windows): config.py, the layers in
model.py, the Hugging Face mapping in hf.py and the FLOP count in flops.py. A new family is a
sibling package with the same four modules."""
