"""Record schemas: Alpaca, chat messages and ShareGPT conversations, all read as chat turns."""

from __future__ import annotations

from typing import Any

from .base import Location

# ShareGPT speakers and the chat roles they become.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


class Alpaca:
    """``instruction``, optional ``input``, ``output``: one user turn and its response."""

    name = "alpaca"

    def matches(self, record: dict[str, Any]) -> bool:
        """The fallback layout: any record that is not chat or ShareGPT."""
        return True

    def validate(self, record: dict[str, Any], where: Location) -> None:
        """Instruction and output are required strings; input, when present, a string."""
        for name in ("instruction", "output"):
            if name not in record:
                raise where.error(
                    "missing (an Alpaca record needs 'instruction' and 'output'; a chat "
                    "record needs 'messages'; a ShareGPT record needs 'conversations')",
                    field=name,
                )
        for name in ("instruction", "input", "output"):
            if name in record and not isinstance(record[name], str):
                found = type(record[name]).__name__
                raise where.error(f"expected a string, found {found}", field=name)

    def prompt_messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        """One user turn: the instruction, then "\\n" and the input if non-empty."""
        instruction, extra = record["instruction"], record.get("input") or ""
        body = f"{instruction}\n{extra}" if extra else instruction
        return [{"role": "user", "content": body}]

    def response(self, record: dict[str, Any]) -> str:
        """The output."""
        return record["output"]


class Turns:
    """A list of turns under ``key``, each with a speaker and a text; the last reply answers."""

    def __init__(
        self, name: str, key: str, speaker: str, text: str, roles: dict[str, str] | None
    ) -> None:
        self.name, self.key, self.speaker, self.text, self.roles = name, key, speaker, text, roles

    def matches(self, record: dict[str, Any]) -> bool:
        """Records that have this schema's list of turns."""
        return self.key in record

    def validate(self, record: dict[str, Any], where: Location) -> None:
        """A non-empty list of string speakers and texts, with at least one assistant turn."""
        turns = record[self.key]
        if not isinstance(turns, list) or not turns:
            raise where.error(f"expected a non-empty list of {self.key}", field=self.key)
        for i, turn in enumerate(turns):
            ok = (
                isinstance(turn, dict)
                and isinstance(turn.get(self.speaker), str)
                and isinstance(turn.get(self.text), str)
            )
            if not ok:
                raise where.error(
                    f"{self.key} {i} needs string '{self.speaker}' and '{self.text}'",
                    field=self.key,
                )
            if self.roles is not None and turn[self.speaker] not in self.roles:
                raise where.error(
                    f"{self.key} {i}: unknown '{self.speaker}' {turn[self.speaker]!r} "
                    f"(use {', '.join(self.roles)})",
                    field=self.key,
                )
        if not any(m["role"] == "assistant" for m in self.messages(record)):
            raise where.error("no assistant turn to use as the response", field=self.key)

    def messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        """Every turn as a chat message (role, content); chat messages are copied as they are."""
        if self.roles is None:
            return [dict(turn) for turn in record[self.key]]
        return [
            {"role": self.roles[turn[self.speaker]], "content": turn[self.text]}
            for turn in record[self.key]
        ]

    def prompt_messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        """The turns before the last assistant turn."""
        messages = self.messages(record)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last]

    def response(self, record: dict[str, Any]) -> str:
        """The last assistant turn."""
        return next(
            m["content"] for m in reversed(self.messages(record)) if m["role"] == "assistant"
        )


CHAT = Turns("chat", "messages", "role", "content", roles=None)
SHAREGPT = Turns("sharegpt", "conversations", "from", "value", roles=SHAREGPT_ROLES)
ALPACA = Alpaca()
