"""Request bodies read the way Ollama reads them: Go's `encoding/json`.

Ollama decodes each body into a Go struct. Go matches an object's keys to the struct's fields without
regard to case (Unicode simple folding: the Kelvin sign U+212A is a `k`, the long s U+017F an `s`), and when
several keys map to one field the last one wins. A proxy that read `body["model"]` the Python way would
check `allowed` in `{"model": "allowed", "Model": "forbidden"}` while Ollama ran `forbidden`. Everything
the agent and the simulator read from a body goes through `GoObject`, so both decide on the value Ollama
will use. Map-typed fields (`options`) keep their keys exactly, in Go as here.
"""

from __future__ import annotations

import functools
import json
from typing import Any


class BodyError(ValueError):
    """A body that is not a JSON object Ollama could read; the message says why (a 400)."""


@functools.lru_cache(maxsize=4096)
def _fold_rune(ch: str) -> str:
    """`ch` under Unicode simple case folding (what Go's `SimpleFold` orbits amount to).

    `str.casefold` applies full folding; where that gives several characters the simple folding is
    taken to leave the character alone. So the folds are exact for every character whose simple folding
    is an ASCII letter (only the Kelvin sign and the long s besides ASCII itself), which is all that the
    ASCII field names of Ollama's structs need: the dotless i and the dotted capital I stay themselves,
    as in Go.
    """
    folded = ch.casefold()
    return folded if len(folded) == 1 else ch


def go_fold(name: str) -> str:
    """A key folded as Go folds struct field names: two keys name one field when their folds are equal."""
    if name.isascii():
        return name.lower()
    return "".join(_fold_rune(ch) for ch in name)


class GoObject(dict):  # type: ignore[type-arg]
    """A JSON object: a dict of its exact keys (what is forwarded), read by field name as Go reads it.

    `get`, `[]` and `in` take a struct field's name and find it under any case, last one winning;
    `count` says how many keys of the object name that field.
    """

    __slots__ = ("_index", "_pairs")

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self._pairs = pairs
        self._index: dict[str, tuple[Any, int]] | None = None  # folded name -> (last value, count)

    def _folded(self) -> dict[str, tuple[Any, int]]:
        # built on first use: most objects of a body (messages) are never asked for a field
        if self._index is None:
            index: dict[str, tuple[Any, int]] = {}
            for key, value in self._pairs:
                folded = go_fold(key)
                index[folded] = (value, index[folded][1] + 1 if folded in index else 1)
            self._index = index
        return self._index

    def get(self, field: str, default: Any = None) -> Any:  # type: ignore[override]
        found = self._folded().get(go_fold(field))
        return default if found is None else found[0]

    def __getitem__(self, field: str) -> Any:
        return self._folded()[go_fold(field)][0]

    def __contains__(self, field: object) -> bool:
        return isinstance(field, str) and go_fold(field) in self._folded()

    def count(self, field: str) -> int:
        found = self._folded().get(go_fold(field))
        return 0 if found is None else found[1]

    def without(self, field: str) -> dict[str, Any]:
        """A plain copy with every key that names `field` removed (to set the field once, canonically)."""
        folded = go_fold(field)
        return {k: v for k, v in self.items() if go_fold(k) != folded}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_object(raw: bytes | str) -> GoObject:
    """Parse a request body that must be one JSON object; BodyError (a 400) says what is wrong.

    Only what Go accepts too: UTF-8 (no byte-order mark, no UTF-16), no NaN or Infinity.
    """
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        value = json.loads(text, object_pairs_hook=GoObject, parse_constant=_no_constant)
    except RecursionError:
        raise BodyError("request body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, GoObject):
        raise BodyError("request body must be a JSON object")
    return value
