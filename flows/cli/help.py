"""Help as a person writes it: ``predict [OPTIONS] PATHS...``, ``--out OUT``, bare flags.

Typer names each value by its Python type (``<path>``, ``<list[str]>``, ``<int range>``,
``<bool>`` after every flag) and writes a required argument as ``{paths}...``. These
command classes keep Typer's layout and panels and name the values as Unix usage lines
do: by the option's name, a choice by its values, a flag by nothing. A param's own
``metavar`` wins.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup


def name_values(params: list[Any]) -> list[Any]:
    """Give each param without a metavar one (in place); returns ``params``."""
    for param in params:
        if param.metavar is not None:
            continue
        described = param.type_descriptor  # Typer's reading of the parameter's annotation
        choices = described.choices if described.is_choice else None
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""  # a flag takes no value
        elif choices:
            param.metavar = "|".join(str(c) for c in choices)
        else:
            param.metavar = param.name.upper() + ("..." if param.nargs != 1 else "")
    return params


def usage_pieces(command: Any, ctx: Any) -> list[str]:
    """``[OPTIONS]`` and the arguments by name: required bare, optional in brackets."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if isinstance(param, TyperArgument):
            pieces.append(param.metavar if param.required else f"[{param.metavar}]")
    return pieces


class Command(TyperCommand):
    """A digitflow command: values named by name (see the module docstring)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return name_values(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return usage_pieces(self, ctx)


class Group(TyperGroup):
    """The ``digitflow`` group: its own options named the same way."""

    def get_params(self, ctx: Any) -> list[Any]:
        return name_values(super().get_params(ctx))
