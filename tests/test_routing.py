"""The routing policy (smart_proxy/routing.py), case by case, from the table in docs/fleet.md."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from smart_proxy.routing import HOPS_HEADER, LOCAL, MAX_HOPS, Candidate, hops, rank, tier

DOC = Path(__file__).parent.parent / "docs" / "fleet.md"
GIB = 1024**3


def parse_candidate(text: str) -> Candidate:
    """``local: loaded free=1 queue=2 full cold=8 weight=2`` as a Candidate."""
    name, _, facts = text.partition(":")
    fields: dict = {"loaded": False}
    for fact in facts.split():
        key, _, value = fact.partition("=")
        if key == "loaded":
            fields["loaded"] = value != "no"
        elif key == "full":
            fields["queue_full"] = True
        elif key == "free":
            fields["free_slots"] = int(value)
        elif key == "queue":
            fields["queue"] = int(value)
        elif key == "cold":
            fields["cold_cost"] = float(value) * GIB
        elif key == "weight":
            fields["weight"] = float(value)
        else:
            raise AssertionError(f"docs/fleet.md: unknown fact {fact!r}")
    if fields["loaded"]:
        fields.setdefault("cold_cost", 0.0)
    return Candidate(name.strip(), **fields)


def doc_cases() -> list[tuple[str, list[Candidate], list[str]]]:
    text = DOC.read_text()
    table = text.split("| case | candidates | order |", 1)[1].split("\n\n", 1)[0]
    cases = []
    for line in table.strip().splitlines()[1:]:
        case, candidates, order = (cell.strip() for cell in line.strip().strip("|").split("|"))
        cases.append((case, [parse_candidate(c) for c in candidates.split(";")], [o.strip() for o in order.split(",")]))
    return cases


CASES = doc_cases()


def test_the_doc_has_the_cases() -> None:
    assert len(CASES) >= 10


@pytest.mark.parametrize(("case", "candidates", "order"), CASES, ids=[case for case, _, _ in CASES])
def test_policy_table(case: str, candidates: list[Candidate], order: list[str]) -> None:
    assert [c.where for c in rank(candidates)] == order, case
    # the order does not depend on the order the candidates were given in
    assert [c.where for c in rank(reversed(candidates))] == order, case


def test_tiers() -> None:
    assert tier(Candidate(LOCAL, loaded=True, free_slots=1)) == 0
    assert tier(Candidate(LOCAL, loaded=True, free_slots=0)) == 1
    assert tier(Candidate("a", loaded=True)) == 1  # a peer's free slots are unknown
    assert tier(Candidate("a", loaded=False, cold_cost=1.0)) == 2
    assert tier(Candidate(LOCAL, loaded=True, free_slots=3, queue_full=True)) == 3


def test_unknown_cold_cost_is_last_among_cold() -> None:
    ranked = rank([Candidate("a", loaded=False), Candidate("b", loaded=False, cold_cost=10 * GIB)])
    assert [c.where for c in ranked] == ["b", "a"]
    assert ranked[1].cold_cost == math.inf


def test_parser_reads_what_the_doc_says() -> None:
    c = parse_candidate("local: loaded free=2 queue=3 weight=2")
    assert (c.where, c.loaded, c.free_slots, c.queue, c.weight, c.cold_cost) == (LOCAL, True, 2, 3, 2.0, 0.0)
    assert re.search(r"\| local queue full: spill over to a peer \|", DOC.read_text())


def test_hops_reads_the_header_and_ignores_what_is_not_a_count() -> None:
    values = (None, b"", b"0", b"2", " 3 ", b"-1", b"x", b"1e3", b"9999999")
    assert [hops(value) for value in values] == [0, 0, 0, 2, 3, 0, 0, 0, 0]
    assert hops(b"5000") == 1000 and MAX_HOPS == 3 and HOPS_HEADER == "x-smart-proxy-hops"
