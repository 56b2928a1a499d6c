"""Parsing ``ssl-xcit pretrain`` arguments into a :class:`PretrainConfig` with jsonargparse.

``--config FILE`` (repeatable) loads YAML deltas, ``--section.key value`` overrides them,
unknown keys and wrong types are refused naming the key.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Optional, Sequence

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace, set_parsing_settings

from ssl_xcit.pretrain.config import PretrainConfig
from ssl_xcit.errors import UserError

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help shows each field's docstring


def pretrain_parser(prog: str = "ssl-xcit pretrain") -> ArgumentParser:
    parser = ArgumentParser(prog=prog, exit_on_error=False, description="DINO pretraining of an XCiT.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML recipe (deltas on the typed defaults)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--resume", action="store_true", help="same as --run.resume true (the default)")
    parser.add_class_arguments(PretrainConfig, fail_untyped=True)
    return parser


def one_line(err: Exception) -> str:
    """A parser error (jsonargparse spreads them over lines) as the one line users see."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _one_line(err: Exception, argv: Sequence[str]) -> str:
    message = one_line(err)
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    return f"{message} (config: {', '.join(configs)})" if configs else message


def parse_pretrain_args(argv: Sequence[str]) -> tuple[PretrainConfig, Namespace, ArgumentParser]:
    """argv → (config, the parsed namespace, the parser that can dump it)."""
    parser = pretrain_parser()
    try:
        namespace = parser.parse_args(list(argv))
        instantiated = parser.instantiate(namespace)
    except (ArgumentError, ValueError, TypeError) as err:
        raise UserError(_one_line(err, argv)) from err
    cfg = PretrainConfig(**{f.name: instantiated[f.name] for f in fields(PretrainConfig)})
    if namespace.resume:
        cfg.run.resume = True
    return cfg, namespace, parser


def config_name(namespace: Namespace) -> str:
    """The stem of the last --config file, or 'default'."""
    files: Optional[list] = namespace.get("config")
    return Path(str(files[-1])).stem if files else "default"


def dump_config(parser: ArgumentParser, namespace: Namespace) -> str:
    """The resolved config as YAML, without the CLI-only flags."""
    clean = namespace.clone()
    for key in ("config", "print_config", "resume"):
        clean.pop(key, None)
    return parser.dump(clean, skip_check=True)
