"""Inference: many adapters on one base (registry), one decode loop, batched LoRA, the engine
thread and the OpenAI-compatible HTTP server (server.py needs the `serve` extra)."""
