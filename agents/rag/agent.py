"""/rag: answer with passages retrieved from a local folder of documents.

Theory of operation: every ``.txt`` and ``.md`` file under the folder named by
``docs`` in config.toml is cut into passages (paragraphs, merged up to
``passage_chars``; a markdown passage remembers the heading it sits under). The
passages are indexed with BM25 (rank-bm25's BM25L, whose scores stay positive on
small corpora and are 0 for a passage that shares no word with the query). The
index is built on the first request and rebuilt only when a file is added,
removed or changed (its path, size or mtime). The ``top_k`` best passages with a
score above ``min_score`` go to the model as a system message naming their
sources; with none, the request is left as it was.

The check, the build and the search run in worker threads, so the event loop
never blocks on the disk or on scoring, and the hook's timeout holds:

* A search is bounded and abandonable. A question longer than ``max_query_chars``
  is refused (the hook fails; the request goes on without context). Only the
  distinct words the documents contain are scored (each weighted by how often the
  question repeats it, which gives BM25's own sum), at most ``max_query_words`` of
  them; between words the thread checks whether its request gave up, so a search
  abandoned at the timeout stops soon and frees what it held.
* Searches share no lock: each scores the index it found, which is never changed
  once built, so one slow request does not hold up the others.
* A build is shared: requests that need the same snapshot wait for one build. It
  runs to its end even if every request waiting for it times out, and the next
  request finds it done: the documents are the operator's, and a build that never
  finished would make every request pay for it again.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
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

    def search(
        self,
        query: str,
        k: int,
        min_score: float,
        max_words: int = 512,
        checkpoint: Callable[[], None] = lambda: None,
    ) -> list[tuple[float, Passage]]:
        """The ``k`` best passages scoring above ``min_score``, best first.

        Scores the first ``max_words`` distinct words of ``query`` that the passages
        contain, each once, times its count (BM25 sums over the query's words, and a
        word no passage has adds nothing). ``checkpoint`` is called before each word;
        it raises to stop the search.
        """
        if self.bm25 is None:
            return []
        known = self.bm25.idf
        counts = Counter(word for word in tokenize(query) if word in known)
        if not counts:
            return []
        scores = np.zeros(len(self.passages))
        for word, count in list(counts.items())[:max_words]:
            checkpoint()
            scores += count * self.bm25.get_scores([word])
        ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(float(scores[i]), self.passages[i]) for i in ranked[:k] if scores[i] > min_score]


@attrs.define(eq=False)
class _Build:
    """One build of the index, shared by the requests that need its snapshot."""

    stamp: tuple[tuple[str, int, int], ...]
    done: trio.Event = attrs.Factory(trio.Event)
    index: Index | None = None
    error: str = ""


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
        self.max_query_chars = int(config.get("max_query_chars", 32_768))
        self.max_query_words = int(config.get("max_query_words", 512))
        if self.top_k < 1 or self.passage_chars < 50:
            raise ValueError("top_k must be at least 1 and passage_chars at least 50")
        if self.max_query_chars < 1 or self.max_query_words < 1:
            raise ValueError("max_query_chars and max_query_words must be at least 1")
        self.index: Index | None = None
        self.builds = 0
        self._build: _Build | None = None

    async def current_index(self) -> Index:
        """The index of the docs folder as it is now, built (or waited for) if it changed."""
        stamp = await trio.to_thread.run_sync(fingerprint, self.docs, abandon_on_cancel=True)
        if self.index is not None and self.index.stamp == stamp:
            return self.index
        build = self._build
        if build is None or build.stamp != stamp:
            build = self._build = _Build(stamp)
            # abandoned if this request gives up; the thread still finishes and publishes the index
            await trio.to_thread.run_sync(self._run_build, build, abandon_on_cancel=True)
        else:
            await build.done.wait()
        if build.index is None:
            raise ValueError(f"the /rag index could not be built: {build.error}")
        return build.index

    def _run_build(self, build: _Build) -> None:
        """In a worker thread: build the index, then hand it to the event loop."""
        try:
            build.index = Index(self.docs, build.stamp, self.passage_chars)
        except Exception as exc:  # told to every request waiting for this build
            build.error = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                trio.from_thread.run_sync(self._finish, build)
            except trio.RunFinishedError:
                pass  # the proxy stopped meanwhile

    def _finish(self, build: _Build) -> None:
        if self._build is build:  # the latest snapshot asked for (an older build finishing late is not)
            self._build = None
            if build.index is not None:
                self.index = build.index
        if build.index is not None:
            self.builds += 1
        build.done.set()

    async def search(self, query: str) -> list[tuple[float, Passage]]:
        """The passages that best match ``query``; abandoned, and soon stopped, if the caller is cancelled.

        Raises:
            ValueError: the query is longer than ``max_query_chars``.
        """
        if len(query) > self.max_query_chars:
            raise ValueError(
                f"the question has {len(query)} characters; /rag searches at most {self.max_query_chars}"
                " (max_query_chars)"
            )
        index = await self.current_index()
        return await trio.to_thread.run_sync(
            index.search,
            query,
            self.top_k,
            self.min_score,
            self.max_query_words,
            trio.from_thread.check_cancelled,
            abandon_on_cancel=True,
        )

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
