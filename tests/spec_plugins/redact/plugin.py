"""Hides e-mail addresses from the model, and tells the reader it did.

An example of a plugin written to the original Ollama-proxy plugin spec, which smart-proxy
loads unchanged (see docs/agents.md, "Plugins written to the Ollama-proxy spec"): one class
with ``on_request(payload) -> dict`` and ``on_response(payload) -> dict``, each given the JSON
dict and returning the dict that replaces it, and a ``config.json`` handed to the constructor.
It imports nothing from smart_proxy. ``on_request`` is a plain function, ``on_response`` a
coroutine: the spec allows either.
"""

import re

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


class RedactPlugin:
    def __init__(self, config: dict) -> None:
        self.replacement = config.get("replacement", "[redacted]")
        self.note = config.get("note", "")

    def on_request(self, payload: dict) -> dict:
        for message in payload.get("messages") or []:
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                message["content"] = EMAIL.sub(self.replacement, message["content"])
        if isinstance(payload.get("prompt"), str):
            payload["prompt"] = EMAIL.sub(self.replacement, payload["prompt"])
        return payload

    async def on_response(self, payload: dict) -> dict:
        for choice in payload.get("choices") or []:
            if isinstance(choice.get("message"), dict):
                choice["message"]["content"] = (choice["message"].get("content") or "") + self.note
            elif isinstance(choice.get("text"), str):
                choice["text"] += self.note
        return payload
