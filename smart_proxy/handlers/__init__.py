"""The handlers: one function per route, whatever its body holds, returning a :class:`~smart_proxy.handlers.reply.Reply`.

Every model route (OpenAI's chat, completions and embeddings; Ollama's chat, generate,
embed, embeddings, show, pull and delete) is one function here that takes the proxy's
state and the request (path, body, arrival time) and returns what to answer: plain
requests, agent commands, models of an Ollama upstream and Ollama's load and unload
requests all go through it. The listing routes (``/v1/models``, ``/api/tags``,
``/api/ps``, ``/api/version``) are here too. Nothing here knows HTTP framing or a web
framework: :mod:`smart_proxy.web` reads the request and sends the reply.
"""
