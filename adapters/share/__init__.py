"""Sharing adapter files: verify and convert what others send, push and pull on the hub."""
