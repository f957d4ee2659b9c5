"""Inference: GGUF models on a torch engine (CPU) or vLLM (GPU), served by Ray Serve."""
