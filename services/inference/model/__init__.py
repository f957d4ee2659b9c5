"""The CPU engine's model code: GGUF loading, the Llama forward pass, int8/int4 weights, the
tokenizer, sampling, the prefix cache and the continuously batching engine (torch).

Importing this package imports nothing heavy; its modules import torch.
"""
