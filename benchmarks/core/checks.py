"""Option values checked against their declared types and ranges, before any work.

Every option a suite gives a registered callable (a method, metric, dataset or model) or a
settings record (``TrainConfig``, ``EvalConfig``) is checked against the parameter's type
annotation when the suite loads. Where a type alone does not say what is allowed, the
annotation says it with ``typing.Annotated`` metadata from this module:

- ``Range(min, max)``: a number within bounds (``open_min`` excludes the bound);
- ``OneOf(choices)``: a name from a fixed set or a registry's keys (read at check time);
- ``OptionsFor(param, choices)``: a dict of keyword options for the callable that another
  parameter names (``perturbation_options`` for ``perturbation``).

and the aliases below (``PositiveInt``, ``Fraction``, ...) name the common cases. A
callable whose options must also fit the images (a region no larger than the image) says so
with ``@fits_image(check)``; the harness runs ``check(options, (height, width))`` as soon as
the image size is known: at plan time for datasets that declare it, else when the data is
read, before any model is trained.

>>> check_value(8, PositiveInt, "region")
>>> check_value("four", PositiveInt, "region")
Traceback (most recent call last):
...
cambench.benchmarks.core.errors.UserError: region = 'four': expected a whole number >= 1
>>> check_value(0, PositiveInt, "epochs")
Traceback (most recent call last):
...
cambench.benchmarks.core.errors.UserError: epochs = 0: must be >= 1
>>> check_value("foo", Literal["predicted", "label"], "target")
Traceback (most recent call last):
...
cambench.benchmarks.core.errors.UserError: target = 'foo': expected one of 'predicted', 'label'
"""

from __future__ import annotations

import collections.abc as cabc
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any, Literal

from cambench.benchmarks.core.errors import UserError


@dataclass(frozen=True)
class Range:
    """A number in [min, max] (either bound optional; ``open_min``, ``open_max``: that bound
    itself excluded)."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False
    open_max: bool = False

    def problem(self, value: float) -> str:
        if self.min is not None and (value <= self.min if self.open_min else value < self.min):
            return f"must be {self.describe()}"
        if self.max is not None and (value >= self.max if self.open_max else value > self.max):
            return f"must be {self.describe()}"
        return ""

    def describe(self) -> str:
        low = "" if self.min is None else f"{'>' if self.open_min else '>='} {_num(self.min)}"
        high = "" if self.max is None else f"{'<' if self.open_max else '<='} {_num(self.max)}"
        return " and ".join(b for b in (low, high) if b)


@dataclass(frozen=True)
class OneOf:
    """A name among ``choices``: an iterable of names or a mapping (its keys), read when
    checked, so a registry that grows is followed."""

    choices: Iterable[str]

    def names(self) -> list[str]:
        return list(self.choices)

    def problem(self, value: Any) -> str:
        names = self.names()
        return "" if value in names else f"expected one of {', '.join(map(repr, names))}"


@dataclass(frozen=True)
class OptionsFor:
    """Keyword options of the callable that option ``param`` names among ``choices``."""

    param: str
    choices: Mapping[str, Callable[..., Any]]


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, open_min=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]  # 0 to 1, both included
OpenFraction = Annotated[float, Range(0, 1, open_min=True)]  # above 0, at most 1

ImageCheck = Callable[[dict[str, Any], tuple[int, int]], str | None]


def fits_image(check: ImageCheck):
    """Decorator: ``check(options, (height, width))`` returns why the options do not fit
    images of that size ("" or None when they do), or raises ``UserError`` saying it; the
    harness calls it once the size is known."""

    def decorate(fn):
        fn.__fits_image__ = check
        return fn

    return decorate


def image_problem(fn: Callable[..., Any], options: dict[str, Any], hw: tuple[int, int]) -> str:
    """Why ``options`` (the suite's; defaults filled in here) do not fit (H, W) images."""
    check = getattr(fn, "__fits_image__", None)
    if check is None:
        return ""
    try:
        return check({**defaults(fn), **options}, (int(hw[0]), int(hw[1]))) or ""
    except UserError as exc:
        return str(exc)


def defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """The default values of ``fn``'s parameters that have one."""
    return {
        n: p.default
        for n, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def hints(obj: Any) -> dict[str, Any]:
    """The evaluated annotations of a callable or dataclass, with ``Annotated`` metadata.
    An annotation that cannot be evaluated raises: a test keeps every registered entry
    checkable, so no option goes unchecked by accident."""
    target = obj
    if inspect.isclass(obj) and not _is_dataclass(obj):
        target = obj.__init__
    return typing.get_type_hints(target, include_extras=True)


def _is_dataclass(obj: Any) -> bool:
    return hasattr(obj, "__dataclass_fields__")


def check_options(obj: Any, options: Mapping[str, Any], where: str) -> None:
    """Check every option against ``obj``'s annotation of that parameter (a callable's
    parameters or a dataclass's fields); the first misfit is a ``UserError``:
    ``<where> <name> = <value>: <what is allowed>``."""
    types_, full = hints(obj), {**defaults(obj), **options}
    for name, value in options.items():
        if name in types_:
            check_value(value, types_[name], f"{where} {name}".strip(), options=full)


def check_value(value: Any, tp: Any, name: str, *, options: Mapping[str, Any] = {}) -> None:  # noqa: B006
    """Raise ``UserError`` naming ``name`` and ``value`` unless the value fits type ``tp``."""
    problem = _problem(value, tp, options)
    if problem:
        raise UserError(f"{name} = {value!r}: {problem}")


def _problem(value: Any, tp: Any, options: Mapping[str, Any]) -> str:
    """Why ``value`` does not fit ``tp`` ("" if it does)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        base, *meta = args
        problem = _problem(value, base, options)
        bounds = [m.describe() for m in meta if isinstance(m, Range)]
        if problem and bounds and problem.startswith("expected a"):
            return f"{problem} {bounds[0]}"
        for m in meta:
            if problem:
                break
            problem = _meta_problem(value, m, options)
        return problem
    if origin in (typing.Union, types.UnionType):
        arms = [_problem(value, arm, options) for arm in args]
        if all(arms):  # the first arm that is not None says what was expected
            real = [a for a, arm in zip(arms, args, strict=True) if arm is not type(None)]
            return real[0] if len(real) == 1 else "expected " + " or ".join(_expected(args))
        return ""
    if origin is Literal:
        return "" if value in args else f"expected one of {', '.join(map(repr, args))}"
    return _plain_problem(value, tp, origin, args, options)


def _plain_problem(value, tp, origin, args, options) -> str:
    if tp is Any or tp is inspect.Parameter.empty:
        return ""
    if tp is type(None):
        return "" if value is None else "expected nothing (None)"
    if tp is bool:
        return "" if isinstance(value, bool) else "expected true or false"
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return "" if ok else "expected a whole number"
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "expected a number"
        return "" if math.isfinite(value) else "expected a finite number"
    if tp is str:
        return "" if isinstance(value, str) else "expected a string"
    if tp in (os.PathLike, PurePath) or (inspect.isclass(tp) and issubclass(tp, PurePath)):
        return "" if isinstance(value, str | PurePath) else "expected a path (a string)"
    container = origin or tp
    if container in (dict, cabc.Mapping):
        return "" if isinstance(value, dict) else "expected a table (a dict)"
    if container in (list, tuple, cabc.Sequence, cabc.Iterable):
        return _sequence_problem(value, container, args, options)
    if inspect.isclass(container):
        return "" if isinstance(value, container) else f"expected a {container.__name__}"
    return ""  # a form this checker does not read (a callable, a type variable)


def _sequence_problem(value, container, args, options) -> str:
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        return "expected a list"
    if container is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            return f"expected a list of {len(args)} values"
        items = list(zip(value, args, strict=True))
    else:
        items = [(v, args[0]) for v in value] if args else []
    for i, (item, tp) in enumerate(items):
        problem = _problem(item, tp, options)
        if problem:
            return f"item {i + 1} ({item!r}): {problem}"
    return ""


def _meta_problem(value: Any, meta: Any, options: Mapping[str, Any]) -> str:
    if isinstance(meta, Range) and isinstance(value, int | float):
        return meta.problem(value)
    if isinstance(meta, OneOf):
        return meta.problem(value)
    if isinstance(meta, OptionsFor) and isinstance(value, dict):
        chosen = options.get(meta.param)
        fn = meta.choices.get(chosen) if isinstance(chosen, str) else None
        if fn is None:
            return ""  # the chosen name is checked (and reported) on its own parameter
        allowed = [
            n for n, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY
        ]
        for key, item in value.items():
            if key not in allowed:
                names = ", ".join(allowed) or "none"
                return f"{chosen!r} takes no option {key!r} (its options: {names})"
            problem = _problem(item, hints(fn).get(key, Any), {})
            if problem:
                return f"option {key} = {item!r}: {problem}"
    return ""


def _expected(args: tuple[Any, ...]) -> list[str]:
    names = []
    for arm in args:
        if arm is type(None):
            continue
        base = typing.get_args(arm)[0] if typing.get_origin(arm) is Annotated else arm
        origin = typing.get_origin(base) or base
        names.append(
            {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(
                origin, "a list" if origin in (list, tuple, cabc.Sequence) else str(base)
            )
        )
    return list(dict.fromkeys(names))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
