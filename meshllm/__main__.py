from meshllm.cli import app

app()
