"""String enums for the names users pass (kinds, methods, sensitivity sources).

Members equal and hash like their string values, so ``unit.kind == "expert"``, JSON
and dict lookups by plain strings keep working, while typos are caught by ``parse``.
Imports nothing from moe_ao.
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

C = TypeVar("C", bound="Choice")


class Choice(str, enum.Enum):
    """Base of moe_ao's string enums."""

    __str__ = str.__str__
    __repr__ = str.__repr__  # messages list them as the strings users type
    __hash__ = str.__hash__
    __format__ = str.__format__

    @classmethod
    def parse(cls: type[C], value: Any, what: str) -> C:
        """The member named by ``value``; ValueError naming ``what`` and the allowed values otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{what}={value!r}; allowed: {tuple(m.value for m in cls)}") from None
