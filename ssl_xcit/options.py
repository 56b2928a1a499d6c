"""One way to read every subcommand's options: a typed dataclass parsed by jsonargparse.

Each subcommand declares its options as a dataclass whose attribute docstrings become
the ``--help`` text. ``--config FILE`` (repeatable) loads YAML holding any of those keys;
``--key value`` (or ``--section.key value`` for nested sections) overrides on top. Unknown
keys and wrong types are refused in one line naming the key and the config file.
Dashes and underscores are interchangeable in option names (``--train-data`` =
``--train_data``), a list takes its values one after the other (``--k 10 20``), and a
switch may stand alone (``--dry-run``).
"""

from __future__ import annotations

import collections.abc
import json
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, Optional, Sequence, TypeVar, get_args, get_origin, get_type_hints

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace, set_parsing_settings

from ssl_xcit.errors import UserError

Options = TypeVar("Options")
CLI_ONLY_KEYS = ("config", "launch", "print_config")

class Parsed(NamedTuple, Generic[Options]):
    """The typed options, the namespace they came from and the parser that can dump it."""

    options: Options
    namespace: Namespace
    parser: ArgumentParser

    def dump(self) -> str:
        """The resolved options as YAML, without the command-line-only flags."""
        clean = self.namespace.clone()
        for key in CLI_ONLY_KEYS:
            clean.pop(key, None)
        return self.parser.dump(clean, skip_validation=True)

    def config_name(self) -> str:
        """The stem of the last ``--config`` file, or 'default'."""
        files: Optional[list] = self.namespace.get("config")
        return Path(str(files[-1])).stem if files else "default"


def options_parser(options: type, prog: str, description: str, config_flag: str = "--config") -> ArgumentParser:
    """A parser of ``options`` (a dataclass) with ``--config`` files (jsonargparse then adds
    ``--print_config``, which prints the resolved options and exits).

    ``--help`` shows each field's attribute docstring: jsonargparse reads those only when its
    process-wide ``docstring_parse_attribute_docstrings`` setting is on, so building a parser
    turns it on (importing this module changes nothing).
    """
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, exit_on_error=False, description=description)
    parser.add_argument(config_flag, action=ActionConfigFile, help="YAML file of any of the keys below (repeatable); "
                        "options given after it override it")
    parser.add_class_arguments(options, fail_untyped=True)
    return parser


def underscored(argv: Sequence[str]) -> list[str]:
    """``--train-data x`` → ``--train_data x``: option names take either spelling; values are untouched."""
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            token = "--" + name.replace("-", "_") + eq + value
        out.append(token)
    return out


def _field_kinds(options: type, prefix: str = "") -> dict[str, str]:
    """'list', 'str-list' or 'bool' for the fields of ``options`` that need one, nested sections
    (a dataclass field) included under ``section.key``."""
    kinds = {}
    hints = get_type_hints(options)
    for f in fields(options):
        hint, key = hints[f.name], prefix + f.name
        if is_dataclass(hint):
            kinds.update(_field_kinds(hint, key + "."))  # type: ignore[arg-type]
        elif hint is bool:
            kinds[key] = "bool"
        elif get_origin(hint) in (list, tuple, collections.abc.Sequence):
            kinds[key] = "str-list" if get_args(hint)[:1] == (str,) else "list"
    return kinds


def shell_style(argv: Sequence[str], options: type) -> list[str]:
    """Command-line habits made jsonargparse values, for top-level and ``--section.key`` options
    alike: ``--dry-run`` alone → ``--dry_run true``; ``--k 10 20`` → ``--k [10, 20]``; a repeated
    list option (``--sweep a=1,2 --sweep b=3``) collects every value. Everything else passes
    unchanged."""
    kinds = _field_kinds(options)
    out: list[str] = []
    lists: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        token, key = argv[i], argv[i][2:] if argv[i].startswith("--") else ""
        values = []
        while kinds.get(key) and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values.append(argv[i + 1])
            i += 1
        i += 1
        if kinds.get(key) == "bool":
            out += [token, *(values or ["true"])]
        elif kinds.get(key) and not (len(values) == 1 and values[0].lstrip().startswith("[")):
            if key not in lists:
                out += [token, key]  # placeholder, filled below
            lists.setdefault(key, []).extend(values)
        else:
            out += [token, *values]
    for key, values in lists.items():
        rendered = json.dumps(values) if kinds[key] == "str-list" else "[" + ", ".join(values) + "]"
        out[out.index(key, out.index(f"--{key}"))] = rendered
    return out


def one_line(err: Exception) -> str:
    """A parser error (jsonargparse spreads them over lines) as the one line users see."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _config_files(argv: Sequence[str], config_flag: str) -> list[str]:
    flag = "--" + config_flag[2:].replace("-", "_")
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def parse_options(options: type[Options], argv: Sequence[str], prog: str, description: str,
                  config_flag: str = "--config") -> Parsed[Options]:
    """argv → the typed options (defaults, then config files, then overrides).

    Raises:
        UserError: an unknown key, a wrong type or an unreadable config file, in one line.
    """
    parser = options_parser(options, prog, description, config_flag)
    argv = shell_style(underscored(argv), options)
    try:
        namespace = parser.parse_args(argv)
        instantiated = parser.instantiate(namespace)
    except (ArgumentError, ValueError, TypeError) as err:
        message = one_line(err)
        configs = _config_files(argv, config_flag)
        raise UserError(f"{message} (config: {', '.join(configs)})" if configs else message) from err
    typed: Any = options(**{f.name: instantiated[f.name] for f in fields(options)})
    return Parsed(typed, namespace, parser)
