"""docs/protocol.md read as data: its tables of messages, fields, chunk header keys, timings and error codes, so
tests can hold the server to the document and the document to the server."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PROTOCOL_DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def _table(text: str, section: str, header: str) -> list[list[str]]:
    """The rows of the first table with ``header`` after the heading ``section``, as lists of cells."""
    start = text.index(f"\n{section}\n")
    lines = text[text.index(f"\n{header}\n", start) + 1:].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line[2:-2].split(" | ")])
    return rows


def ticked(cell: str) -> list[str]:
    """The names in backticks in a cell, in order."""
    return re.findall(r"`([^`]+)`", cell)


@dataclass(frozen=True)
class ClientRow:
    fields: list[str]
    answer: str | None
    """The type of the gateway's answer; None when it sends none."""


@dataclass(frozen=True)
class ProtocolDoc:
    client: dict[str, ClientRow]
    server: dict[str, list[str]]
    """A gateway -> client message type and its fields."""
    header_keys: list[str]
    timings: list[str]
    error_codes: list[str]
    close_codes: list[int]

    @classmethod
    def read(cls, path: Path = PROTOCOL_DOC) -> ProtocolDoc:
        text = path.read_text()
        client = {
            ticked(row[0])[0]: ClientRow(ticked(row[1]), (ticked(row[3]) or [None])[0])
            for row in _table(text, "## Client → gateway", "| type | fields | effect | answer |")
        }
        server = {ticked(row[0])[0]: ticked(row[1])
                  for row in _table(text, "## Gateway → client", "| type | fields | meaning |")}
        header = [key for row in _table(text, "## Gateway → client", "| key | meaning |") for key in ticked(row[0])]
        timings = [ticked(row[0])[0] for row in _table(text, "## Gateway → client", "| timing | meaning |")]
        codes = [ticked(row[0])[0] for row in _table(text, "## Error codes", "| code | when |")]
        closes = [int(row[0]) for row in _table(text, "## Close codes", "| code | when |")]
        return cls(client, server, header, timings, codes, closes)
