"""/parallel: ask several models, or several samples of one, at once; keep the best or all.

Theory of operation: the agent takes over the upstream call. It plans one
candidate per (model, sample): ``models`` from config.toml (empty: the model the
client named) times ``samples``. Samples of one model get distinct seeds unless
the request fixes one. Every candidate runs in its own task of one Trio nursery,
through the proxy's pool (``ctx.complete``), with its own timing and, if
``candidate_timeout`` is set, its own deadline. A candidate that fails or times out
is recorded and the others go on; only when every candidate fails does the call
fail (and the chain falls back to the ordinary upstream call). The agent's own
timeout, and a client that goes away, cancel the nursery and so every candidate
still running; each one's lease is released and its upstream answer closed.

``mode = "best"`` returns the one answer ``pick`` prefers: ``logprob`` (highest
mean token log-probability, which the candidates are asked for), ``longest`` or
``fastest``; ties go to the earlier candidate. ``mode = "all"`` returns every
answer as a choice (``choices[i]``, like OpenAI's ``n``). Either way the response
carries ``smart_proxy.parallel``: each candidate's model, sample, status,
seconds, score and, for "all", which choice it became.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import attrs
import trio

from smart_proxy.agents import Agent, AgentContext
from smart_proxy.errors import ProxyError, UpstreamError

log = logging.getLogger("smart_proxy.agents.parallel")

MODES = ("best", "all")
PICKS = ("logprob", "longest", "fastest")


@attrs.define(eq=False)
class Candidate:
    model: str
    sample: int
    payload: dict[str, Any]
    status: str = "pending"  # ok, error or timeout
    seconds: float = 0.0
    response: dict[str, Any] | None = None
    error: str | None = None
    score: float | None = None


def choice_text(choice: dict[str, Any]) -> str:
    if "message" in choice:
        return str((choice.get("message") or {}).get("content") or "")
    return str(choice.get("text") or "")


def mean_logprob(choice: dict[str, Any]) -> float:
    """Mean token log-probability of a choice; -inf when it has none."""
    logprobs = choice.get("logprobs") or {}
    values = [t.get("logprob") for t in logprobs.get("content") or [] if isinstance(t, dict)]
    if not values:
        values = list(logprobs.get("token_logprobs") or [])
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else -math.inf


class Parallel(Agent):
    description = "Ask several models or samples at once, in parallel; return the best answer or all of them"

    def __init__(self, config: dict[str, Any], folder: Path) -> None:
        super().__init__(config, folder)
        models = config.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ValueError("models must be a list of model names")
        self.models: list[str] = models
        self.samples = int(config.get("samples", 2))
        self.mode = str(config.get("mode", "best"))
        self.pick = str(config.get("pick", "logprob"))
        self.candidate_timeout = float(config.get("candidate_timeout", 0)) or math.inf
        if self.samples < 1:
            raise ValueError("samples must be at least 1")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.pick not in PICKS:
            raise ValueError(f"pick must be one of {', '.join(PICKS)}, not {self.pick!r}")

    def plan(self, ctx: AgentContext) -> list[Candidate]:
        candidates = []
        for model in self.models or [ctx.model]:
            for sample in range(self.samples):
                payload = {**ctx.payload, "model": model}
                if self.samples > 1 and "seed" not in ctx.payload:
                    payload["seed"] = sample + 1
                if self.mode == "best" and self.pick == "logprob" and not ctx.payload.get("logprobs"):
                    payload["logprobs"] = True if ctx.kind == "chat" else 1
                candidates.append(Candidate(model, sample, payload))
        return candidates

    async def call(self, ctx: AgentContext) -> dict[str, Any]:
        candidates = self.plan(ctx)
        async with trio.open_nursery() as nursery:
            for candidate in candidates:
                nursery.start_soon(self._run, ctx, candidate)
        succeeded = [c for c in candidates if c.status == "ok"]
        if not succeeded:
            reasons = "; ".join(f"{c.model}#{c.sample}: {c.error}" for c in candidates)
            raise UpstreamError(f"every candidate failed: {reasons}")
        return self._best(ctx, candidates) if self.mode == "best" else self._all(ctx, candidates)

    async def _run(self, ctx: AgentContext, candidate: Candidate) -> None:
        started = trio.current_time()
        try:
            with trio.move_on_after(self.candidate_timeout) as scope:
                candidate.response = await ctx.complete(candidate.payload)
                choices = candidate.response.get("choices") or []
                if not choices:
                    raise UpstreamError("the answer has no choices")
                candidate.status = "ok"
            if scope.cancelled_caught:
                candidate.status, candidate.error = "timeout", f"no answer within {self.candidate_timeout:g}s"
        except (ProxyError, ValueError, TypeError, KeyError, AttributeError) as exc:
            # one candidate's failure is recorded, never allowed to fail the others
            candidate.status = "error"
            candidate.error = exc.message if isinstance(exc, ProxyError) else f"{type(exc).__name__}: {exc}"
        finally:
            candidate.seconds = trio.current_time() - started
        log.info(
            "request %s: /parallel candidate %s#%d %s in %.3fs",
            ctx.request_id,
            candidate.model,
            candidate.sample,
            candidate.status,
            candidate.seconds,
        )

    def _score(self, candidate: Candidate) -> float:
        choice = candidate.response["choices"][0]  # type: ignore[index]
        if self.pick == "logprob":
            return mean_logprob(choice)
        if self.pick == "longest":
            return float(len(choice_text(choice)))
        return -candidate.seconds

    def _clean(self, ctx: AgentContext, choice: dict[str, Any], index: int) -> dict[str, Any]:
        choice = {**choice, "index": index}
        if not ctx.payload.get("logprobs"):
            choice.pop("logprobs", None)  # we asked for them to score; the client did not
        return choice

    def _report(self, candidates: list[Candidate], **extra: Any) -> dict[str, Any]:
        rows = []
        for candidate in candidates:
            row: dict[str, Any] = {
                "model": candidate.model,
                "sample": candidate.sample,
                "status": candidate.status,
                "seconds": round(candidate.seconds, 4),
            }
            if candidate.score is not None:
                row["score"] = candidate.score if math.isfinite(candidate.score) else None
            if candidate.error:
                row["error"] = candidate.error
            if candidate.response and isinstance(candidate.response.get("usage"), dict):
                row["completion_tokens"] = candidate.response["usage"].get("completion_tokens")
            rows.append(row)
        return {"mode": self.mode, "pick": self.pick, **extra, "candidates": rows}

    def _with_report(self, response: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
        extension = dict(response.get("smart_proxy") or {})
        extension["parallel"] = report
        return {**response, "smart_proxy": extension}

    def _best(self, ctx: AgentContext, candidates: list[Candidate]) -> dict[str, Any]:
        succeeded = [c for c in candidates if c.status == "ok"]
        for candidate in succeeded:
            candidate.score = self._score(candidate)
        best = max(succeeded, key=lambda c: (c.score, -candidates.index(c)))
        response = dict(best.response)  # type: ignore[arg-type]
        response["choices"] = [self._clean(ctx, response["choices"][0], 0)]
        return self._with_report(response, self._report(candidates, chosen=candidates.index(best)))

    def _all(self, ctx: AgentContext, candidates: list[Candidate]) -> dict[str, Any]:
        succeeded = [c for c in candidates if c.status == "ok"]
        response = dict(succeeded[0].response)  # type: ignore[arg-type]
        response["model"] = ctx.model
        response["choices"] = [self._clean(ctx, c.response["choices"][0], i) for i, c in enumerate(succeeded)]  # type: ignore[index]
        usage: dict[str, int] = {}
        for candidate in succeeded:
            for key, value in (candidate.response.get("usage") or {}).items():  # type: ignore[union-attr]
                if isinstance(value, int):
                    usage[key] = usage.get(key, 0) + value
        response["usage"] = usage
        report = self._report(candidates)
        for row, candidate in zip(report["candidates"], candidates, strict=True):
            if candidate in succeeded:
                row["choice"] = succeeded.index(candidate)
        return self._with_report(response, report)
