"""The trainer service: fine-tuning jobs on Ray Train, their files, and the candidates they make."""
