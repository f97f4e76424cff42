"""Model families. Each is a package holding its config, its layers, its Hugging Face
mapping and its FLOP count; `matmul` is the one function every weight multiply goes through."""
