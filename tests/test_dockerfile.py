"""Static checks of the Dockerfile (CI has no Docker engine, so it cannot build it).

What can be caught without building: the base image is an NGC PyTorch image with a
pinned tag (not ``latest``); every COPY source exists in the build context and is
not excluded by .dockerignore; everything setup.py reads is copied before the
package is installed; a RUN line pip-installs this package (``.``, the directory
whose setup.py is named megatron_stgc) and megatron-core pinned to the version
setup.py allows and CI tests; the program in CMD/ENTRYPOINT exists (the console
script declared in setup.py, resolved to a callable, run with the image's
default arguments); the base image's Python and torch (recorded from NVIDIA's release
notes) fit the pinned megatron-core, and neither megatron-core nor this package can make pip
replace the image's torch (--no-deps). Each check is also shown to reject a broken Dockerfile,
including the original mistake: NGC 25.01 (torch 2.6.0a0) with megatron-core 0.16.1 installed
with its dependencies, where pip pulls a PyPI torch over the image's.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from megatron_stgc.mcore_compat import TESTED_VERSIONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(REPO, "Dockerfile")
DOCKERIGNORE = os.path.join(REPO, ".dockerignore")

# What an NGC PyTorch image holds, from NVIDIA's PyTorch container release notes
# (docs.nvidia.com/deeplearning/frameworks/pytorch-release-notes/rel-YY-MM.html).
# A tag not listed here fails the check until its Python and torch are looked up.
NGC_PYTORCH = {
    "25.01-py3": {"python": "3.12", "torch": "2.6.0a0"},  # torch 2.6.0a0+ecf3bae40a
    "25.12-py3": {"python": "3.12", "torch": "2.10.0a0"},  # torch 2.10.0a0+b4e4ee81d3
}
# Requires-Python and the torch requirement of each megatron-core release CI tests
# (the wheels' METADATA).
MEGATRON_CORE = {
    "0.16.1": {"python": ">=3.10", "torch": ">=2.6.0"},
    "0.17.1": {"python": ">=3.12", "torch": ">=2.6.0"},
    "0.18.2": {"python": ">=3.12", "torch": ">=2.6.0"},
    "0.19.2": {"python": ">=3.12", "torch": ">=2.6.0"},
}
assert set(MEGATRON_CORE) == set(TESTED_VERSIONS)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def ignore_patterns() -> list[str]:
    if not os.path.exists(DOCKERIGNORE):
        return []
    with open(DOCKERIGNORE) as f:
        return [line.strip().rstrip("/") for line in f
                if line.strip() and not line.startswith("#")]


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore ``patterns`` exclude ``path`` (or a directory above it).
    Supports what our .dockerignore uses: plain paths, globs and ``**/`` prefixes."""
    parts = os.path.normpath(path).split(os.sep)
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in (p.lstrip("/") for p in patterns):
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatch(prefix.split("/")[-1], pattern[3:]):
                return True
    return False


def setup_metadata() -> dict:
    """name, console scripts and install_requires from setup.py (parsed, not executed)."""
    with open(os.path.join(REPO, "setup.py")) as f:
        tree = ast.parse(f.read())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "setup")
    values = {}
    for keyword in call.keywords:
        try:
            values[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            pass
    return values


def _commands(run_arguments: str) -> list[list[str]]:
    """A shell-form RUN split into its commands (at && and ;), each as shell words."""
    commands, current = [], []
    for token in shlex.split(run_arguments):
        if token in ("&&", ";", "||"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return commands + [current]


def _exec_form(arguments: str) -> list[str]:
    if arguments.startswith("["):
        return json.loads(arguments)
    return shlex.split(arguments)


def problems(text: str, ignored: list[str]) -> list[str]:
    """Everything wrong with a Dockerfile that can be seen without building it."""
    found = []
    steps = instructions(text)
    meta = setup_metadata()
    froms = [args for word, args in steps if word == "FROM"]
    if not froms:
        return ["no FROM"]
    image = froms[0].split()[0]
    match = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\S+)", image)
    if match is None:
        found.append(f"base image {image} is not nvcr.io/nvidia/pytorch:<tag>")
    elif not re.fullmatch(r"\d{2}\.\d{2}-py3", match.group(1)):
        found.append(f"base image tag {match.group(1)!r} is not a pinned NGC release (YY.MM-py3)")
    image_facts = NGC_PYTORCH.get(match.group(1)) if match else None
    if match and image_facts is None:
        found.append(f"base image tag {match.group(1)!r}: its Python and torch are not recorded "
                     "in NGC_PYTORCH (look them up in NVIDIA's release notes)")

    copied, install_at = set(), None
    for index, (word, args) in enumerate(steps):
        if word in ("COPY", "ADD"):
            parts = [p for p in _exec_form(args) if not p.startswith("--")]
            for source in parts[:-1]:
                if not os.path.exists(os.path.join(REPO, source)):
                    found.append(f"{word} {source}: not in the build context")
                elif is_ignored(source, ignored):
                    found.append(f"{word} {source}: excluded by .dockerignore")
                copied.add(os.path.normpath(source))
        if word == "RUN":
            for tokens in _commands(args):
                if tokens[:2] == ["pip", "install"] or tokens[:4] == ["python", "-m", "pip",
                                                                      "install"]:
                    targets = [t for t in tokens if not t.startswith("-")][2:]
                    if "." in targets or "./" in targets:
                        install_at = index
                        needed = {"setup.py", "pyproject.toml", "README.md",
                                  "megatron_stgc"}
                        missing = needed - copied
                        if missing:
                            found.append(f"pip install . runs before COPY of {sorted(missing)}")
                    no_deps = "--no-deps" in tokens
                    if ("." in targets or "./" in targets) and not no_deps:
                        found.append("pip install . without --no-deps: setup.py's torch "
                                     "requirement lets pip replace the image's torch")
                    for target in targets:
                        if target.startswith("megatron-core") or target.startswith("megatron_core"):
                            pinned = re.fullmatch(r"megatron-core==(\S+)", target)
                            if pinned is None or pinned.group(1) not in TESTED_VERSIONS:
                                found.append(f"megatron-core is not pinned to a version CI tests "
                                             f"({', '.join(TESTED_VERSIONS)}): {target!r}")
                                continue
                            found += _megatron_core_fits_image(pinned.group(1), image_facts,
                                                               no_deps)
    if install_at is None:
        found.append("no RUN line pip-installs this package (pip install [-e] .)")
    elif meta.get("name") != "megatron_stgc":
        found.append(f"setup.py at the install path names {meta.get('name')!r}")
    if not any(re.fullmatch(r"megatron-core==\S+", t) for w, a in steps if w == "RUN"
               for command in _commands(a) for t in command):
        found.append("megatron-core is not installed pinned")

    program = None
    for word, args in steps:
        if word in ("ENTRYPOINT", "CMD"):
            command = _exec_form(args)
            if word == "ENTRYPOINT" or program is None:
                program = command
    if not program:
        found.append("no CMD or ENTRYPOINT")
    else:
        scripts = dict(entry.replace(" ", "").split("=", 1)
                       for entry in meta.get("entry_points", {}).get("console_scripts", []))
        if program[0] in scripts:
            module, _, attribute = scripts[program[0]].partition(":")
            if not callable(getattr(importlib.import_module(module), attribute, None)):
                found.append(f"{program[0]} -> {scripts[program[0]]} is not a callable")
        elif program[0] in ("python", "python3") and program[1:2] == ["-m"]:
            if importlib.util.find_spec(program[2]) is None:
                found.append(f"module {program[2]} does not exist")
        elif program[0] not in ("torchrun", "bash", "sh"):
            found.append(f"the entry point {program[0]!r} is neither a console script of "
                         "setup.py nor python -m <module>")
    return found


def _megatron_core_fits_image(version: str, image: dict | None, no_deps: bool) -> list[str]:
    """megatron-core ``version`` installed into the NGC image described by ``image``."""
    if image is None:
        return []
    needs = MEGATRON_CORE[version]
    found = []
    if not SpecifierSet(needs["python"]).contains(image["python"]):
        found.append(f"megatron-core {version} needs Python {needs['python']}; the base image "
                     f"has Python {image['python']}")
    torch_ok = SpecifierSet(needs["torch"]).contains(Version(image["torch"]), prereleases=True)
    if not no_deps:
        if not torch_ok:
            found.append(f"megatron-core {version} needs torch {needs['torch']}, which the "
                         f"image's torch {image['torch']} does not satisfy: pip would replace "
                         "the image's torch (install megatron-core with --no-deps)")
        else:
            found.append(f"megatron-core {version} installed without --no-deps: pip may upgrade "
                         "the image's torch or its other pinned packages")
    return found


def _dockerfile() -> str:
    with open(DOCKERFILE) as f:
        return f.read()


def test_dockerfile_passes_the_static_checks():
    assert problems(_dockerfile(), ignore_patterns()) == []


def test_dockerignore_keeps_the_context_small_and_the_package_in():
    patterns = ignore_patterns()
    for path in (".git", "runs", "megatron_stgc/__pycache__"):
        assert is_ignored(path, patterns), path
    for path in ("megatron_stgc", "setup.py", "README.md", "examples", "tools"):
        assert not is_ignored(path, patterns), path


def test_default_command_runs():
    """The image's default command, run here through the same console-script target."""
    steps = instructions(_dockerfile())
    command = next(_exec_form(a) for w, a in reversed(steps) if w == "CMD")
    assert command[0] == "megatron-stgc"
    done = subprocess.run([sys.executable, "-m", "megatron_stgc", *command[1:]],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout


BASE = "FROM nvcr.io/nvidia/pytorch:25.12-py3"
MCORE = 'pip install --no-cache-dir --no-deps "megatron-core==0.19.2"'
BROKEN = [
    (BASE, "FROM nvcr.io/nvidia/pytorch:latest", "tag"),
    (BASE, "FROM python:3.11", "not nvcr.io"),
    (BASE, "FROM nvcr.io/nvidia/pytorch:26.99-py3", "not recorded in NGC_PYTORCH"),
    ("COPY megatron_stgc ./megatron_stgc", "COPY megatron_stgcx ./megatron_stgc",
     "not in the build context"),
    ("pip install --no-cache-dir --no-deps -e .", "pip install --no-cache-dir --no-deps -e ./x",
     "no RUN line"),
    ("pip install --no-cache-dir --no-deps -e .", "pip install --no-cache-dir -e .",
     "pip install . without --no-deps"),
    ('"megatron-core==0.19.2"', '"megatron-core>=0.16"', "pinned"),
    ('"megatron-core==0.19.2"', '"megatron-core==0.19.0"', "not pinned to a version CI tests"),
    (MCORE, 'pip install --no-cache-dir "megatron-core==0.19.2"', "installed without --no-deps"),
    ('CMD ["megatron-stgc", "--help"]', 'CMD ["megatron-stgcc", "--help"]', "entry point"),
]


@pytest.mark.parametrize("old,new,expected", BROKEN, ids=[b[2] for b in BROKEN])
def test_the_checks_catch_broken_dockerfiles(old, new, expected):
    text = _dockerfile()
    assert old in text
    found = problems(text.replace(old, new), ignore_patterns())
    assert any(expected in problem for problem in found), found


def test_the_checks_catch_an_ignored_source_and_a_late_copy():
    text = _dockerfile()
    assert any("excluded by .dockerignore" in p
               for p in problems(text, ignore_patterns() + ["examples"]))
    late = text.replace("COPY megatron_stgc ./megatron_stgc\n", "") + \
        "\nCOPY megatron_stgc ./megatron_stgc\n"
    assert any("runs before COPY" in p for p in problems(late, ignore_patterns()))


def test_the_checks_catch_the_ngc_torch_replacement():
    """NGC 25.01's torch 2.6.0a0 does not satisfy megatron-core's torch>=2.6.0: installing
    megatron-core 0.16.1 with its dependencies there replaces the image's torch."""
    text = _dockerfile().replace(BASE, "FROM nvcr.io/nvidia/pytorch:25.01-py3").replace(
        MCORE, 'pip install --no-cache-dir "megatron-core==0.16.1"')
    found = problems(text, ignore_patterns())
    assert any("pip would replace the image's torch" in p for p in found), found


def test_the_checks_catch_a_megatron_core_the_image_python_cannot_run():
    found = _megatron_core_fits_image("0.19.2", {"python": "3.10", "torch": "2.9.0"}, True)
    assert any("needs Python >=3.12" in p for p in found), found
