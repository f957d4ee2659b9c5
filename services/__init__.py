"""The meshllm services, one package each."""
