"""The `epic` command line: thin wrappers over the library.

Every command prints a one-line header of what it runs. A mistake in what it was given (a missing file, an unknown
method, a budget larger than the image, a folder that is not a LLaVA model, ...) ends it with one line,
`epic COMMAND: message`, and exit status 2; `epic --debug COMMAND ...` (or `EPIC_DEBUG=1`) shows the traceback.
"""

from __future__ import annotations

import os
import sys

from epic.cli.commands import train
from epic.cli.common import USAGE_ERROR
from epic.cli.parser import build_parser

__all__ = ["USAGE_ERROR", "build_parser", "main"]


def _raised(error: BaseException, module: str, name: str) -> bool:
    """Whether `error` is `module.name`, without importing `module` (it was imported if it raised one): the parser
    and `--help` stay free of torch."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(error, getattr(loaded, name))


def _one_line(error: BaseException) -> str:
    """An error as the one line a command prints."""
    if _raised(error, "epic.data.records", "DataError"):
        return error.first_line()
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.filename}: no such file or folder (check the path)"
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; a mistake in its input is one line on stderr and exit status 2 (`--debug`: the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("EPIC_DEBUG", "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    name = argv[0] if argv else ""
    try:
        if name == "train" and not {"-h", "--help"} & set(argv):
            return train(argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except Exception as error:
        ordinary = isinstance(error, (ValueError, OSError)) or _raised(error, "epic.compat", "IncompatibleTransformers")
        if debug or not ordinary:
            raise
        print(f"epic {name}: {_one_line(error)}", file=sys.stderr)
        return USAGE_ERROR
