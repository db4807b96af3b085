"""The HTTP dialects smart-proxy speaks: OpenAI's, Ollama's, and its own admin routes."""

from .ollama import error_response as ollama_errors
from .openai import error_response as openai_errors

__all__ = ["ollama_errors", "openai_errors"]
