"""/rag: answer with passages retrieved from a local folder of documents.

Theory of operation: every ``.txt`` and ``.md`` file under the folder named by
``docs`` in config.toml is cut into passages (paragraphs, merged up to
``passage_chars``; a markdown passage remembers the heading it sits under). The
passages are indexed with BM25 (rank-bm25's BM25L, whose scores stay positive on
small corpora and are 0 for a passage that shares no word with the query). The
index is built on the first request and rebuilt only when a file is added,
removed or changed (its path, size or mtime); the check, the build and the search
run in a worker thread, one request at a time, so the event loop never blocks on
the disk. The ``top_k`` best passages with a score above ``min_score`` go to the
model as a system message naming their sources; with none, the request is left as
it was.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import trio
from rank_bm25 import BM25L

from smart_proxy.agents import Agent, AgentContext

SUFFIXES = (".md", ".txt")
_WORD = re.compile(r"\w+")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
#: Words too common to tell passages apart; dropped from passages and queries alike.
STOPWORDS = frozenset(
    "a an and are as at be but by can do does for from has have how i if in into is it its me my no not of on "
    "or our so than that the their them then there these they this to was we were what when where which who "
    "why will with you your".split()
)
PREAMBLE = (
    "Answer the user's question using the context below when it is relevant, and say which "
    "source ([1], [2], ...) the answer comes from."
)


def tokenize(text: str) -> list[str]:
    return [word for word in _WORD.findall(text.lower()) if word not in STOPWORDS]


@attrs.frozen
class Passage:
    source: str  # the file, relative to the docs folder
    heading: str
    text: str

    def label(self) -> str:
        return f"{self.source} > {self.heading}" if self.heading else self.source


def split_passages(source: str, text: str, limit: int) -> list[Passage]:
    """Paragraphs of ``text`` merged up to ``limit`` characters; a long one is cut at sentences."""
    passages: list[Passage] = []
    heading, buffer = "", ""

    def flush() -> None:
        nonlocal buffer
        if buffer.strip():
            passages.append(Passage(source, heading, buffer.strip()))
        buffer = ""

    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        first, _, rest = paragraph.partition("\n")
        if match := _HEADING.match(first):
            flush()
            heading, paragraph = match.group(1), rest.strip()
            if not paragraph:
                continue
        for piece in _cut(paragraph, limit):
            if buffer and len(buffer) + len(piece) + 2 > limit:
                flush()
            buffer = f"{buffer}\n\n{piece}" if buffer else piece
    flush()
    return passages


def _cut(paragraph: str, limit: int) -> list[str]:
    if len(paragraph) <= limit:
        return [paragraph]
    pieces, piece = [], ""
    for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
        while len(sentence) > limit:  # one enormous "sentence": cut it hard
            pieces.append(sentence[:limit])
            sentence = sentence[limit:]
        if piece and len(piece) + len(sentence) + 1 > limit:
            pieces.append(piece)
            piece = ""
        piece = f"{piece} {sentence}" if piece else sentence
    if piece:
        pieces.append(piece)
    return pieces


def fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What the index depends on: every document's path, size and mtime."""
    if not folder.is_dir():
        return ()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    return tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in files)


class Index:
    """BM25 over the passages of one snapshot of the docs folder."""

    def __init__(self, folder: Path, stamp: tuple[tuple[str, int, int], ...], passage_chars: int) -> None:
        self.stamp = stamp
        self.passages: list[Passage] = []
        for path, _size, _mtime in stamp:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
            self.passages += split_passages(str(Path(path).relative_to(folder)), text, passage_chars)
        corpus = [tokenize(f"{p.heading}\n{p.text}") for p in self.passages]
        self.bm25 = BM25L(corpus) if any(corpus) else None

    def search(self, query: str, k: int, min_score: float) -> list[tuple[float, Passage]]:
        words = tokenize(query)
        if self.bm25 is None or not words:
            return []
        scores = self.bm25.get_scores(words)
        ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(float(scores[i]), self.passages[i]) for i in ranked[:k] if scores[i] > min_score]


def context_message(hits: list[tuple[float, Passage]]) -> str:
    blocks = [f"[{n}] (source: {passage.label()})\n{passage.text}" for n, (_, passage) in enumerate(hits, 1)]
    return PREAMBLE + "\n\n" + "\n\n".join(blocks)


class Rag(Agent):
    description = "Retrieval: the passages of local documents that best match the question (BM25) go to the model"

    def __init__(self, config: dict[str, Any], folder: Path) -> None:
        super().__init__(config, folder)
        self.docs = (folder / str(config.get("docs", "docs"))).expanduser().resolve()
        self.top_k = int(config.get("top_k", 3))
        self.passage_chars = int(config.get("passage_chars", 800))
        self.min_score = float(config.get("min_score", 0.0))
        if self.top_k < 1 or self.passage_chars < 50:
            raise ValueError("top_k must be at least 1 and passage_chars at least 50")
        self.index: Index | None = None
        self.builds = 0
        self._lock = trio.Lock()

    def _refresh_and_search(self, query: str) -> list[tuple[float, Passage]]:
        """In a worker thread: rebuild the index if the folder changed, then search it."""
        stamp = fingerprint(self.docs)
        if self.index is None or self.index.stamp != stamp:
            self.index = Index(self.docs, stamp, self.passage_chars)
            self.builds += 1
        return self.index.search(query, self.top_k, self.min_score)

    async def search(self, query: str) -> list[tuple[float, Passage]]:
        async with self._lock:
            return await trio.to_thread.run_sync(self._refresh_and_search, query)

    async def on_request(self, ctx: AgentContext) -> None:
        query = ctx.text
        if not query:
            return
        hits = await self.search(query)
        ctx.state["rag"] = [{"source": p.label(), "score": score} for score, p in hits]
        if not hits:
            return
        context = context_message(hits)
        if ctx.kind == "completion":
            ctx.text = f"{context}\n\n{query}"
            return
        messages = list(ctx.payload["messages"])
        first = messages[0] if messages else None
        if isinstance(first, dict) and first.get("role") == "system" and isinstance(first.get("content"), str):
            # many chat templates (gemma's among them) allow one system message, first
            messages[0] = {**first, "content": f"{first['content']}\n\n{context}"}
        else:
            messages.insert(0, {"role": "system", "content": context})
        ctx.payload["messages"] = messages
