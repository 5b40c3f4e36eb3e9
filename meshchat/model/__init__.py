"""What is in a GGUF file: its spec, its fingerprint, slices of its layers, the model store."""
