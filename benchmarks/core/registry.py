"""One small generic registry, one instance per kind (methods, metrics, datasets, models).

An entry is a name, the object registered under it, aliases, and one typed metadata
record (the ``info``) that the runner and the docs read. Unknown names answer with the
close matches; listing takes shell-style wildcards and exclusions, sorted naturally.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Info:
...     family: str = "cam"
>>> reg = Registry("method", Info)
>>> @reg.register("gradcam", aliases=("grad-cam",), family="cam")
... def gradcam(): ...
>>> reg.get("grad-cam").name
'gradcam'
>>> reg.names("grad*")
['gradcam']
>>> reg.get("gradcam+")
Traceback (most recent call last):
...
cambench.benchmarks.core.errors.UnknownNameError: Unknown method 'gradcam+'. Did you mean: gradcam? Available: gradcam
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cambench.benchmarks.core.errors import UnknownNameError

InfoT = TypeVar("InfoT")
ObjT = TypeVar("ObjT", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[InfoT]):
    """A registered object with its canonical name, aliases and metadata record."""

    name: str
    obj: Callable[..., Any]
    info: InfoT
    aliases: tuple[str, ...] = ()

    @property
    def doc(self) -> str:
        """First line of the object's docstring, for listings."""
        text = (self.obj.__doc__ or "").strip()
        return text.splitlines()[0] if text else ""


def natural_key(text: str) -> list[Any]:
    """Sort key that orders 'resnet18' before 'resnet101' and 'x2' before 'x10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Names that look like ``name``: edit-distance matches first, then substring matches."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    stem = re.sub(r"[^a-z0-9]", "", name.lower())
    for cand in candidates:
        if len(found) >= n:
            break
        flat = re.sub(r"[^a-z0-9]", "", cand.lower())
        if stem and cand not in found and (stem in flat or flat in stem):
            found.append(cand)
    return found


class Registry(Generic[InfoT]):
    """Name -> entry map for one kind of thing, with typed metadata per entry."""

    def __init__(self, kind: str, info_type: type[InfoT]):
        self.kind = kind
        self.info_type = info_type
        self._entries: dict[str, Entry[InfoT]] = {}
        self._aliases: dict[str, str] = {}

    def register(
        self, name: str, *, aliases: Iterable[str] = (), **info: Any
    ) -> Callable[[ObjT], ObjT]:
        """Decorator: register the decorated callable as ``name`` with metadata ``info``."""

        def decorate(obj: ObjT) -> ObjT:
            self.add(name, obj, aliases=aliases, **info)
            return obj

        return decorate

    def add(
        self, name: str, obj: Callable[..., Any], *, aliases: Iterable[str] = (), **info: Any
    ) -> Entry[InfoT]:
        """Register ``obj`` as ``name``; registering a taken name to another object is an error."""
        aliases = tuple(aliases)
        for key in (name, *aliases):
            owner = self._aliases.get(key)
            if owner is not None and self._entries[owner].obj is not obj:
                raise ValueError(
                    f"{self.kind} name {key!r} is already registered to "
                    f"{self._entries[owner].obj!r}; pick another name or alias"
                )
        entry = Entry(name=name, obj=obj, info=self.info_type(**info), aliases=aliases)
        self._entries[name] = entry
        for key in (name, *aliases):
            self._aliases[key] = name
        return entry

    def remove(self, name: str) -> None:
        """Unregister ``name`` (or the entry an alias names) and its aliases; for tests and
        plugins that register an entry for a while."""
        canonical = self._aliases[name] if name in self._aliases else name
        entry = self._entries.pop(canonical)
        for key in (canonical, *entry.aliases):
            self._aliases.pop(key, None)

    def get(self, name: str) -> Entry[InfoT]:
        """The entry for ``name`` or an alias; unknown names raise with the close matches."""
        try:
            return self._entries[self._aliases[name]]
        except KeyError:
            raise UnknownNameError(self._unknown_message(name)) from None

    def _unknown_message(self, name: str) -> str:
        # an alias stands for its entry: suggest each entry once, by its canonical name
        matches = list(dict.fromkeys(self._aliases[m] for m in close_matches(name, self._aliases)))
        hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
        return f"Unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names())}"

    def names(
        self, include: str | Iterable[str] = "*", exclude: str | Iterable[str] = ()
    ) -> list[str]:
        """Canonical names matching any ``include`` wildcard and no ``exclude`` one, sorted naturally.

        A pattern without wildcards must name an entry (or alias): a typo is an error, not an
        empty selection.
        """
        includes = [include] if isinstance(include, str) else list(include)
        excludes = [exclude] if isinstance(exclude, str) else list(exclude)
        chosen: list[str] = []
        for pattern in includes:
            if not any(ch in pattern for ch in "*?["):
                hit = [self.get(pattern).name]
            else:
                hit = [n for n in self._entries if fnmatch.fnmatchcase(n, pattern)]
                if not hit:
                    raise UnknownNameError(
                        f"No {self.kind} matches {pattern!r}. Available: {', '.join(self.names())}"
                    )
            chosen.extend(n for n in hit if n not in chosen)
        kept = [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in excludes)]
        return sorted(kept, key=natural_key)

    def __contains__(self, name: object) -> bool:
        return name in self._aliases

    def __iter__(self) -> Iterator[Entry[InfoT]]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)
