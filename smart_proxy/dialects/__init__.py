"""The APIs clients speak (OpenAI's, Ollama's): request checks, translation, error bodies, stream framing; no I/O."""
