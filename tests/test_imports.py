"""Importing ssl-xcit changes nothing process-wide: no environment variable, warning filter,
torch setting, logging configuration, signal handler or jsonargparse setting differs after
every module of the package is imported (compared with the state after importing the
third-party packages those modules import, whose own import effects are not ours)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO

PROBE = r"""
import ast, importlib, json, logging, os, pkgutil, signal, sys, warnings
from dataclasses import dataclass
from pathlib import Path

import ssl_xcit

modules = sorted(m.name for m in pkgutil.walk_packages(ssl_xcit.__path__, "ssl_xcit."))
third_party = set()
for name in modules:
    tree = ast.parse(Path(importlib.util.find_spec(name).origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            third_party |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            third_party.add(node.module)
for name in sorted(third_party):
    if not name.startswith("ssl_xcit"):
        importlib.import_module(name)

def state():
    import torch
    return {
        "environ": dict(os.environ),
        "warning filters": [repr(f) for f in warnings.filters],
        "torch": [torch.get_default_dtype() is torch.float32, torch.get_num_threads(),
                  torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision(),
                  torch.backends.cudnn.benchmark, torch.is_grad_enabled()],
        "logging": [logging.getLogger().level, len(logging.getLogger().handlers)],
        "signals": [repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)],
    }

@dataclass
class Probe:
    field: int = 0
    '''ATTRIBUTE-DOCSTRING'''

def jsonargparse_reads_attribute_docstrings():
    from jsonargparse import ArgumentParser
    parser = ArgumentParser()
    parser.add_class_arguments(Probe)
    return "ATTRIBUTE-DOCSTRING" in parser.format_help()

before, docstrings_before = state(), jsonargparse_reads_attribute_docstrings()
for name in modules:
    importlib.import_module(name)
after, docstrings_after = state(), jsonargparse_reads_attribute_docstrings()
changed = {key: [before[key], after[key]] for key in before if before[key] != after[key]}
if "environ" in changed:
    changed["environ"] = {k: [before["environ"].get(k), after["environ"].get(k)]
                          for k in set(before["environ"]) | set(after["environ"])
                          if before["environ"].get(k) != after["environ"].get(k)}
if "warning filters" in changed:
    old, new = before["warning filters"], after["warning filters"]
    changed["warning filters"] = {"added": [f for f in new if f not in old], "removed": [f for f in old if f not in new]}
if docstrings_before != docstrings_after:
    changed["jsonargparse attribute docstrings"] = [docstrings_before, docstrings_after]
print(json.dumps({"modules": len(modules), "changed": changed}, default=str))
"""


def test_importing_every_module_changes_no_process_wide_state():
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO)}  # no JSONARGPARSE_* or other settings inherited
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["modules"] > 30
    assert report["changed"] == {}, report["changed"]


def test_parsing_a_recipe_warns_nothing():
    """Our parsers use jsonargparse's current API: no deprecation notice reaches the user."""
    script = ("import warnings; warnings.simplefilter('error')\n"
              "from ssl_xcit.pretrain.command import parse_pretrain_args\n"
              "print(parse_pretrain_args(['--config', 'configs/quickstart.yaml']).dump().count('arch:'))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr[-3000:]
