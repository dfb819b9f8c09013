"""One registry type for every named choice in cdfsl: ``Registry``.

A registry maps names (or types, for LoRA layouts) to implementations. It reads like a dict
(``name in REG``, ``REG[name]``, ``sorted(REG)``), adds entries with :meth:`Registry.register`
(directly or as a decorator) or :meth:`Registry.add` (for entries that carry their own key, e.g. a
class with a ``name``), refuses a name registered twice, and answers an unknown name with
one line that lists what exists (:meth:`Registry.lookup`). :meth:`Registry.resolve` also takes a
dotted ``class_path``, so a recipe names a built-in by its short name and a user's own class by
its import path, the same way everywhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from cdfsl.errors import CdfslError

K = TypeVar("K")
T = TypeVar("T")

__all__ = ["Registry", "import_class_path"]


def import_class_path(path: str, expected: str, example: str) -> Any:
    """The object a recipe's dotted ``class_path`` names (``module.Class``, ``module.ROW``).

    ``expected`` and ``example`` name what it should be, for the error when it is not found.
    """
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise CdfslError(
            f"class_path {path!r}: expected an importable {expected} such as {example}; fix the "
            "dotted path"
        ) from err


class Registry(Mapping[K, T], Generic[K, T]):
    """Named implementations of one choice (``kind``, e.g. "geometry").

    ``fix``: what the one-line error for an unknown name tells the user to do;
    ``error``: the ``CdfslError`` subclass it raises; ``key_of``: the key an entry carries, for
    :meth:`add`; ``check``: called on every entry :meth:`add` is given, to refuse a bad one.
    """

    def __init__(
        self,
        kind: str,
        entries: Mapping[K, T] | None = None,
        *,
        fix: str = "fix the recipe",
        error: type[CdfslError] = CdfslError,
        key_of: Callable[[T], K] | None = None,
        check: Callable[[T], None] | None = None,
    ) -> None:
        self.kind, self.fix, self.error = kind, fix, error
        self.key_of, self.check = key_of, check
        self._entries: dict[K, T] = {}
        for key, value in (entries or {}).items():
            self.register(key, value)

    def register(self, key: K, value: T | None = None) -> Any:
        """Add ``value`` under ``key``; without ``value``, a decorator that adds what it wraps.

        Registering a taken key again is an error (the same value again is a no-op).
        """
        if value is None:

            def add(item: T) -> T:
                self.register(key, item)
                return item

            return add
        if key in self._entries and self._entries[key] is not value:
            raise self.error(
                f"{self.kind} {_shown(key)} is already registered: expected a new name; "
                "rename the new one"
            )
        self._entries[key] = value
        return value

    def add(self, value: T) -> T:
        """Register ``value`` under ``key_of(value)`` after ``check(value)``; returns ``value``,
        so that it also decorates a class."""
        if self.key_of is None:
            raise TypeError(f"the {self.kind} registry has no key_of: use register(key, value)")
        if self.check is not None:
            self.check(value)
        return self.register(self.key_of(value), value)

    def names(self) -> list[str]:
        """The registered keys as text, sorted."""
        return sorted(_shown(key, quote=False) for key in self._entries)

    def lookup(self, key: K, option: str | None = None) -> T:
        """The entry under ``key``, or a one-line error naming ``option`` and the known keys."""
        if key not in self._entries:
            what = f"{option}={key!r}" if option else f"unknown {self.kind} {_shown(key)}"
            raise self.error(f"{what}: expected one of {self.names()}; {self.fix}")
        return self._entries[key]

    def resolve(self, entry: str, base: type | None = None, example: str = "") -> Any:
        """A registered name, or the dotted ``class_path`` of a ``base`` subclass (imported)."""
        if entry in self._entries:
            return self._entries[entry]  # type: ignore[index]
        if "." not in entry:
            return self.lookup(entry)  # type: ignore[arg-type]
        expected = f"{base.__name__} class" if base is not None else self.kind
        found = import_class_path(entry, expected, example or f"one of {self.names()}")
        if base is not None and not (isinstance(found, type) and issubclass(found, base)):
            article = "an" if base.__name__[:1] in "AEIOUX" else "a"
            raise self.error(
                f"{entry!r} is {found!r}: expected {article} {base.__name__} subclass; {self.fix}"
            )
        return found

    def __getitem__(self, key: K) -> T:
        return self._entries[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _shown(key: object, quote: bool = True) -> str:
    if isinstance(key, type):
        return key.__qualname__
    return repr(key) if quote else str(key)
