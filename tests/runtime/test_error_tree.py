"""The error tree drawn in ``goqd/errors.py``'s docstring is the tree the code defines.

Every public exception goqd raises on purpose is a ``GoqdError`` and is drawn under its
real parent; a class added elsewhere, moved or renamed without redrawing the tree fails
here. Private classes (a leading underscore) stay inside their module and are not drawn.
The tools and the simulators are not the daemon: their modules are not walked.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

import goqd
from goqd import errors
from goqd.errors import GoqdError

SKIPPED = ("goqd.tools", "goqd.sim")


def goqd_modules() -> list[str]:
    """Every module of the goqd package, the tools and simulators left out."""
    names = [
        info.name
        for info in pkgutil.walk_packages(goqd.__path__, prefix="goqd.")
        if not info.name.startswith(SKIPPED)
    ]
    for name in names:
        importlib.import_module(name)
    return names


def defined_errors() -> dict[str, type[GoqdError]]:
    """Every public ``GoqdError`` subclass a goqd module defines, by name."""
    goqd_modules()
    found: dict[str, type[GoqdError]] = {}
    todo: list[type[GoqdError]] = [GoqdError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        module = cls.__module__
        if not module.startswith("goqd") or module.startswith(SKIPPED):
            continue  # a test's or a tool's own subclass
        if not cls.__name__.startswith("_"):
            assert cls.__name__ not in found or found[cls.__name__] is cls, (
                f"two public error classes named {cls.__name__}: "
                f"{found[cls.__name__].__module__} and {module}"
            )
            found[cls.__name__] = cls
    return found


def drawn_tree(doc: str) -> dict[str, str | None]:
    """The tree of the docstring's ``::`` block: each drawn class and its drawn parent."""
    block = doc.split("::\n", 1)[1].strip("\n").split("\n\n", 1)[0]
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        drawn = re.match(r"( *)([A-Z]\w*)\b", line)
        if drawn is None:
            continue  # a description carried over to the next line
        depth, name = len(drawn.group(1)), drawn.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((depth, name))
    return parents


def drift(doc: str) -> list[str]:
    """How the tree drawn in ``doc`` differs from the classes the code defines."""
    drawn = drawn_tree(doc)
    defined = defined_errors()
    problems = []
    for name, cls in sorted(defined.items()):
        if name not in drawn:
            problems.append(f"{cls.__module__}.{name} is not drawn in goqd/errors.py")
            continue
        if cls is GoqdError:
            continue
        parent = next(b for b in cls.__mro__[1:] if issubclass(b, GoqdError))
        if drawn[name] != parent.__name__:
            problems.append(f"{name} is drawn under {drawn[name]}, its base is {parent.__name__}")
    problems += [
        f"{name} is drawn but no goqd module defines it" for name in drawn if name not in defined
    ]
    return problems


def test_every_public_error_class_is_drawn_under_its_parent() -> None:
    assert len(defined_errors()) >= 25  # the walk found the tree, not an empty corner
    assert drift(errors.__doc__ or "") == []


def test_a_class_left_out_of_the_drawing_is_found() -> None:
    doc = errors.__doc__ or ""
    line = next(ln for ln in doc.splitlines() if ln.strip().startswith("NotFound "))
    assert drift(doc.replace(line + "\n", "")) == [
        "goqd.errors.NotFound is not drawn in goqd/errors.py"
    ]
    # Drawn one level too high: under ControlError's parent instead of ControlError.
    moved = doc.replace(line, line.replace("        NotFound", "      NotFound", 1))
    assert "NotFound is drawn under GoqdError, its base is ControlError" in drift(moved)
