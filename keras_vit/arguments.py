"""Builder arguments declared once: a dataclass field each, with its default, its documentation and its check.

``argument(default, doc, check=...)`` declares one; the builder's accepted arguments, its signature
(``help``, ``inspect.signature``), its docstring, its config, the unknown-argument suggestions, the constructors'
pass-through and the README's argument table all read the declarations (``declared``) instead of listing names.
The checks here are the shared ones (``boolean``, ``count``, ``choice``, ``rate``); each raises
``ArgumentError`` naming the argument and the value.
"""

import dataclasses
import difflib
import inspect
import numbers

import numpy as np


class ArgumentError(ValueError):
    """A builder argument's value cannot describe a model: ``name``, ``value`` and what it must be (``expected``)."""

    def __init__(self, name, value, expected, message=None):
        self.name, self.value, self.expected = name, value, expected
        super().__init__(message or f"{name} must be {expected}, got {value!r}.")


class UnknownArgumentsError(TypeError):
    """Keyword arguments ``where`` does not take: ``names`` (sorted), ``suggestions`` ({name: closest valid name or
    None}) and ``valid`` (every accepted name)."""

    def __init__(self, unknown, valid, where):
        self.names = sorted(unknown)
        self.valid = sorted(valid)
        self.where = where
        self.suggestions = {name: next(iter(difflib.get_close_matches(name, self.valid, n=1)), None)
                            for name in self.names}
        parts = [f"{name!r}" + (f" (did you mean {close!r}?)" if close else "") for name, close in self.suggestions.items()]
        super().__init__(f"{where} got unexpected keyword argument(s) {', '.join(parts)}. Valid: {', '.join(self.valid)}.")


def unknown_arguments_error(unknown, valid, where):
    """An ``UnknownArgumentsError`` (a ``TypeError``) for keyword arguments ``where`` does not take."""
    return UnknownArgumentsError(unknown, valid, where)


def argument(default, doc, check=None, given=False, compare=True, to_config=None):
    """A dataclass field declaring one builder argument.

    ``doc``: one sentence for the documentation (signature, docstring, README table). ``check(name, value)``:
    raises for a value the argument cannot take (run on the value as given). ``given``: the model's config keeps
    the value as given rather than the dataclass's resolved value (for arguments resolved against others, such as
    ``classes`` without a head). ``compare=False``: left out of equality (an argument whose effect another field
    holds). ``to_config(value)``: the value as the config stores it (JSON-ready), when not the value itself.
    """
    return dataclasses.field(default=default, compare=compare,
                             metadata={"doc": doc, "check": check, "given": given, "to_config": to_config})


def declared(*classes):
    """The declared builder arguments of ``classes`` (dataclasses), in order: their ``argument`` fields."""
    return [field for cls in classes for field in dataclasses.fields(cls) if "doc" in field.metadata]


def config_of(given, *instances):
    """``{argument: value}`` a model's config stores for the declared arguments of ``instances`` (dataclasses): the
    value as ``given`` (a dict) for ``given=True`` fields (a bool as bool), else the instance's resolved value;
    each through its field's ``to_config``."""
    config = {}
    for instance in instances:
        for field in declared(type(instance)):
            value = given[field.name] if field.metadata["given"] else getattr(instance, field.name)
            if field.metadata["given"] and isinstance(field.default, bool):
                value = bool(value)
            convert = field.metadata["to_config"]
            config[field.name] = value if convert is None or value is None else convert(value)
    return config


def make(cls, given):
    """An instance of the dataclass ``cls`` from its declared arguments' values in ``given`` (a dict)."""
    return cls(**{field.name: given[field.name] for field in declared(cls)})


def check_declared(instance):
    """Runs the declared check of every argument field of ``instance`` on its value."""
    for field in declared(type(instance)):
        if field.metadata["check"] is not None:
            field.metadata["check"](field.name, getattr(instance, field.name))


def signature(fields, extra=(), self_parameter=True):
    """An ``inspect.Signature`` with one parameter per declared field (its default), then ``extra`` parameters."""
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] if self_parameter else []
    parameters += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default) for f in fields]
    return inspect.Signature([*parameters, *extra])


def set_signature(cls, fields, extra):
    """Gives ``cls`` and its ``__init__`` the signature of ``fields`` then ``extra`` (``inspect.Parameter``s), for
    ``help`` and ``inspect.signature``; fills the ``{args}`` of its docstring with the fields' documentation."""
    init = signature(fields, extra)
    cls.__init__.__signature__ = init
    cls.__signature__ = init.replace(parameters=list(init.parameters.values())[1:])
    cls.__doc__ = cls.__doc__.format(args=docstring_args(fields))


def bind(fields, args, kwargs, where, extra=()):
    """``{argument: value}`` of every field (defaults filled) from a call's positional ``args`` and keyword
    ``kwargs``; the fields' keywords are taken out of ``kwargs``. A keyword that is neither a field nor in ``extra``
    is an ``UnknownArgumentsError`` naming the closest valid one."""
    names = [field.name for field in fields]
    unknown = set(kwargs) - set(names) - set(extra)
    if unknown:
        raise unknown_arguments_error(unknown, [*names, *extra], where)
    if len(args) > len(names):
        raise TypeError(f"{where} takes at most {len(names)} positional arguments, got {len(args)}.")
    given = {field.name: field.default for field in fields}
    given.update(zip(names, args))
    given.update((name, kwargs.pop(name)) for name in names if name in kwargs)
    return given


def docstring_args(fields, indent="        "):
    """The ``Args:`` lines of a docstring for ``fields``: ``name: doc``, wrapped at 116 columns."""
    import textwrap

    lines = []
    for field in fields:
        lines += textwrap.wrap(f"{field.name}: {field.metadata['doc']}", 116, initial_indent=indent,
                               subsequent_indent=indent + "    ")
    return "\n".join(lines)


def table(fields):
    """A Markdown table of ``fields``: argument, default, meaning (the README's argument table)."""
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    rows += [f"| `{f.name}` | `{f.default!r}` | {f.metadata['doc']} |" for f in fields]
    return "\n".join(rows)


# --- shared checks ------------------------------------------------------------------------------------------------


def boolean(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(name, value, "True or False")


def _int_at_least(minimum, what=None):
    def check(name, value):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
            bound = "a positive int" if minimum == 1 else f"an int >= {minimum}"
            raise ArgumentError(name, value, f"{bound}{f' ({what})' if what else ''}")

    return check


positive = _int_at_least(1)
count = _int_at_least(0)


def positive_int(what):
    """A check: a positive int, described as ``what`` in the error."""
    return _int_at_least(1, what)


def optional(check):
    """A check that also accepts None."""
    return lambda name, value: None if value is None else check(name, value)


def choice(options):
    """A check: one of ``options()`` (a function, so that registries read at call time decide)."""

    def check(name, value):
        if value not in options():
            raise ArgumentError(name, value, f"one of {tuple(options())}")

    return check


def rate(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ArgumentError(name, value, "in [0, 1) (the probability of dropping)")
