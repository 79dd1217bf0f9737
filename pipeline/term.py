"""Terms: the pure description of a pipeline.

A pipeline is a graph of terms. Building and analysing terms does no I/O and needs no event loop;
the engine (`pipeline.engine`) turns terms into live nodes and evaluates them. A term used twice
is one node: terms are identified by object identity.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pipeline.output import Failed, Ok, Output

if TYPE_CHECKING:
    from pipeline.monitor import Monitor

A = TypeVar("A")
B = TypeVar("B")
T = TypeVar("T")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _call_site() -> tuple[str, int]:
    """The first stack frame outside this package: where the user built the term."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return ("<unknown>", 0)
    return (frame.f_code.co_filename, frame.f_lineno)


def _function_label(f: Callable[..., Any], default: str) -> str:
    name = getattr(f, "__name__", "")
    return default if not name or name == "<lambda>" else name


class Term(Generic[T]):
    """A node of the pipeline description producing values of type `T`.

    `inputs` are the terms it reads; `label` names it in diagrams; `site` is the
    (file, line) where it was created, for error messages.
    """

    __slots__ = ("inputs", "label", "site")
    kind = "term"

    def __init__(self, inputs: tuple[Term[Any], ...], label: str) -> None:
        for term in inputs:
            if not isinstance(term, Term):
                raise TypeError(f"{label}: expected a Term as input, got {type(term).__name__}")
        self.inputs = inputs
        self.label = label
        self.site = _call_site()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label!r}>"

    def map(self, f: Callable[[T], B], *, label: str | None = None) -> Term[B]:
        """Apply a pure function to this term's value (see `pipeline.map`)."""
        return Map(f, self, label=label)

    def bind(self, f: Callable[[T], Term[B]], *, label: str | None = None) -> Term[B]:
        """Build the rest of the graph from this term's value (see `pipeline.bind`)."""
        return Bind(f, self, label=label)


class Const(Term[T]):
    """A constant value."""

    __slots__ = ("value",)
    kind = "const"

    def __init__(self, value: T, *, label: str | None = None) -> None:
        super().__init__((), label if label is not None else _value_label(value))
        self.value = value


class Fail(Term[Any]):
    """A term that always fails with `message`."""

    __slots__ = ("message",)
    kind = "fail"

    def __init__(self, message: str, *, label: str | None = None) -> None:
        super().__init__((), label or "fail")
        self.message = message


class Map(Term[B]):
    """`f` applied to the value of `input`; an exception raised by `f` fails this node."""

    __slots__ = ("f",)
    kind = "map"

    def __init__(self, f: Callable[[A], B], input: Term[A], *, label: str | None = None) -> None:
        super().__init__((input,), label or _function_label(f, "map"))
        self.f = f


class Pair(Term[tuple[A, B]]):
    """The values of two terms as a tuple."""

    __slots__ = ()
    kind = "pair"

    def __init__(self, a: Term[A], b: Term[B], *, label: str | None = None) -> None:
        super().__init__((a, b), label or "pair")


class All(Term[list[T]]):
    """The values of several terms as a list; an error names the inputs that failed."""

    __slots__ = ("names",)
    kind = "all"

    def __init__(
        self,
        terms: Iterable[Term[T]],
        names: Iterable[str] | None = None,
        *,
        label: str | None = None,
    ) -> None:
        terms = tuple(terms)
        super().__init__(terms, label or "all")
        self.names = tuple(names) if names is not None else tuple(t.label for t in terms)


class Bind(Term[B]):
    """A dynamic sub-graph: `f` receives the value of `input` and returns the term to evaluate.

    When the input's value changes the previous sub-graph is torn down: its monitors are released
    and its auto-cancel jobs cancelled.
    """

    __slots__ = ("f",)
    kind = "bind"

    def __init__(
        self, f: Callable[[A], Term[B]], input: Term[A], *, label: str | None = None
    ) -> None:
        super().__init__((input,), label or _function_label(f, "bind"))
        self.f = f


class Item(Term[T]):
    """The current value of one item of a `ListMap` or `OptionMap`: an input of its sub-pipeline."""

    __slots__ = ("key",)
    kind = "item"

    def __init__(self, key: Hashable, label: str) -> None:
        super().__init__((), label)
        self.key = key


class ListMap(Term[list[B]]):
    """A sub-pipeline per item of a list, created once per item key and reused while it stays.

    `f` receives a term for the item and returns the item's sub-pipeline; `key` gives each item's
    identity (default: the item itself). Items whose key disappears have their sub-pipelines torn
    down. The result is the list of the sub-pipelines' values, in the input's order.
    """

    __slots__ = ("f", "key")
    kind = "list_map"

    def __init__(
        self,
        f: Callable[[Term[A]], Term[B]],
        input: Term[list[A]],
        *,
        key: Callable[[A], Hashable] | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__((input,), label or _function_label(f, "list_map"))
        self.f = f
        self.key = key


class OptionMap(Term[B | None]):
    """`f`'s sub-pipeline while `input` holds a value other than None; None otherwise."""

    __slots__ = ("f",)
    kind = "option_map"

    def __init__(
        self, f: Callable[[Term[A]], Term[B]], input: Term[A | None], *, label: str | None = None
    ) -> None:
        super().__init__((input,), label or _function_label(f, "option_map"))
        self.f = f


class Gate(Term[T]):
    """`input`'s value, held back until `on` is ok; fails when `on` fails."""

    __slots__ = ()
    kind = "gate"

    def __init__(self, input: Term[T], on: Term[Any], *, label: str | None = None) -> None:
        super().__init__((input, on), label or "gate")

    @property
    def on(self) -> Term[Any]:
        """The term that must be ok before the value passes."""
        return self.inputs[1]


class Collapse(Term[T]):
    """`output`'s value; the diagram draws everything between `input` and `output` as one box.

    The box is labelled `key: value` and opens when the diagram is drawn with `key=value` in its
    expanded set.
    """

    __slots__ = ("group_input", "key", "value")
    kind = "collapse"

    def __init__(self, key: str, value: str, input: Term[Any], output: Term[T]) -> None:
        super().__init__((output,), f"{key}: {value}")
        self.key = key
        self.value = value
        self.group_input = input

    @property
    def expand_id(self) -> str:
        """The identifier that opens this group in a diagram."""
        return f"{self.key}={self.value}"


class Component(Term[T]):
    """`input`'s value under a name shown in the diagram."""

    __slots__ = ()
    kind = "component"

    def __init__(self, label: str, input: Term[T]) -> None:
        super().__init__((input,), label)


class State(Term[Output]):
    """The output of `input` itself as a value (`Ok`, `Failed` or `Active`): never fails."""

    __slots__ = ()
    kind = "state"

    def __init__(self, input: Term[Any], *, label: str | None = None) -> None:
        super().__init__((input,), label or "state")


class Catch(Term[Ok[T] | Failed]):
    """`Ok(value)` or `Failed(message)` as a value once `input` is finished; pending until then."""

    __slots__ = ()
    kind = "catch"

    def __init__(self, input: Term[T], *, label: str | None = None) -> None:
        super().__init__((input,), label or "catch")


class Cutoff(Term[T]):
    """`input`'s value, not propagated while `eq(old, new)` holds."""

    __slots__ = ("eq",)
    kind = "cutoff"

    def __init__(
        self, input: Term[T], eq: Callable[[T, T], bool], *, label: str | None = None
    ) -> None:
        super().__init__((input,), label or "cutoff")
        self.eq = eq


class Watch(Term[T]):
    """The value read by a `Monitor`, kept up to date while the pipeline uses it."""

    __slots__ = ("monitor",)
    kind = "monitor"

    def __init__(self, monitor: Monitor[T]) -> None:
        super().__init__((), monitor.label)
        self.monitor = monitor


class Variable(Term[T]):
    """A settable input: `set(value)` or `fail(message)` re-evaluates what depends on it.

    Listeners are the live nodes of engines using this variable; setting it from the event loop's
    thread schedules them.
    """

    __slots__ = ("_listeners", "output")
    kind = "variable"

    def __init__(self, value: Any = None, *, label: str = "variable", unset: bool = False) -> None:
        super().__init__((), label)
        self.output: Output = Failed("Variable not set") if unset else Ok(value)
        self._listeners: set[Callable[[], None]] = set()

    def set(self, value: T) -> None:
        """Give the variable a new value."""
        self._update(Ok(value))

    def fail(self, message: str) -> None:
        """Make the variable an error."""
        self._update(Failed(message))

    def _update(self, output: Output) -> None:
        if output == self.output:
            return
        self.output = output
        for listener in tuple(self._listeners):
            listener()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each change (used by the engine)."""
        self._listeners.add(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        """Stop calling `listener`."""
        self._listeners.discard(listener)


class Primitive(Term[T]):
    """A cached operation (builder or publisher) applied to a key and, for publishers, a value,
    with the configuration its runs receive (None for an operation that takes none)."""

    __slots__ = ("config", "op")
    kind = "primitive"

    def __init__(
        self, op: Any, key: Term[Any], value: Term[Any] | None, *, label: str, config: Any
    ) -> None:
        super().__init__((key,) if value is None else (key, value), label)
        self.op = op
        self.config = config


_SCALARS = (str, bytes, int, float, bool, type(None))
MAX_DEFAULT_LABEL = 40
"""The longest label a constant gets from its value."""


def _value_label(value: Any) -> str:
    """A constant's label when none is given: the repr of a scalar (`'main'`, `42`), shortened;
    the type's name for anything else, whose repr is code rather than a name
    (`Commit(repo='/tmp/...`)."""
    if type(value) not in _SCALARS:
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= MAX_DEFAULT_LABEL else text[: MAX_DEFAULT_LABEL - 1] + "…"


def as_term(value: Term[T] | T) -> Term[T]:
    """`value` itself if it is a term, otherwise a constant term holding it."""
    return value if isinstance(value, Term) else Const(value)


# Public combinators, in OCurrent's vocabulary.


def const(value: T, *, label: str | None = None) -> Term[T]:
    """A term whose value is always `value`, drawn as `label` (default: the repr of a scalar
    value, the type's name of any other)."""
    return Const(value, label=label)


def fail(message: str) -> Term[Any]:
    """A term that always fails with `message`."""
    return Fail(message)


def map(f: Callable[[A], B], term: Term[A], *, label: str | None = None) -> Term[B]:
    """Apply the pure function `f` to the value of `term`."""
    return Map(f, term, label=label)


def pair(a: Term[A], b: Term[B], *, label: str | None = None) -> Term[tuple[A, B]]:
    """Both values as a tuple: ok when both are ok."""
    return Pair(a, b, label=label)


def all(*terms: Term[T], label: str | None = None) -> Term[list[T]]:
    """All values as a list; an error names the failed inputs ("alpine, debian failed: ...")."""
    return All(terms, label=label)


def all_labelled(terms: Mapping[str, Term[T]], *, label: str | None = None) -> Term[list[T]]:
    """Like `all`, naming each input by its key in error messages."""
    return All(terms.values(), names=terms.keys(), label=label)


def bind(f: Callable[[A], Term[B]], term: Term[A], *, label: str | None = None) -> Term[B]:
    """A dynamic sub-graph built by `f` from the value of `term`."""
    return Bind(f, term, label=label)


def list_map(
    f: Callable[[Term[A]], Term[B]],
    term: Term[list[A]],
    *,
    key: Callable[[A], Hashable] | None = None,
    label: str | None = None,
) -> Term[list[B]]:
    """A sub-pipeline `f(item)` per item of `term`'s list, kept per `key(item)`."""
    return ListMap(f, term, key=key, label=label)


def option_map(
    f: Callable[[Term[A]], Term[B]], term: Term[A | None], *, label: str | None = None
) -> Term[B | None]:
    """The sub-pipeline `f(value)` while `term` is not None."""
    return OptionMap(f, term, label=label)


def gate(term: Term[T], *, on: Term[Any], label: str | None = None) -> Term[T]:
    """`term`'s value once `on` is ok."""
    return Gate(term, on, label=label)


def collapse(key: str, value: str, *, input: Term[Any], output: Term[T]) -> Term[T]:
    """Draw the part of the graph between `input` and `output` as one box until expanded."""
    return Collapse(key, value, input, output)


def component(label: str, term: Term[T]) -> Term[T]:
    """`term` drawn under the name `label`."""
    return Component(label, term)


def state(term: Term[Any], *, label: str | None = None) -> Term[Output]:
    """The output of `term` (Ok, Failed or Active) as an ok value."""
    return State(term, label=label)


def catch(term: Term[T], *, label: str | None = None) -> Term[Ok[T] | Failed]:
    """Turn an error of `term` into a value; still pending while `term` is."""
    return Catch(term, label=label)


def cutoff(
    term: Term[T], eq: Callable[[T, T], bool] = lambda a, b: a == b, *, label: str | None = None
) -> Term[T]:
    """Stop propagation while `eq(previous, new)` holds."""
    return Cutoff(term, eq, label=label)


def watch(monitor: Monitor[T]) -> Term[T]:
    """The value of a monitored input."""
    return Watch(monitor)
