"""Talking to upstreams: llama-servers (a lean HTTP/1.1 client) and Ollama servers (httpx), and relaying their answers."""
