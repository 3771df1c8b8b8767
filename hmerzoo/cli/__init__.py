"""The ``hmerzoo`` command line: train, eval, predict, list, config, convert, data, plot, export, demo.

Each module of this package defines a group of verbs and adds them with ``add_parsers(sub)``; a new verb goes in
the module of its group (or a new module listed in ``VERB_MODULES``).

Every error hmerzoo raises on purpose (a :class:`HmerzooError`), and an operating-system error on a file, prints as
one message and exits with status 2; ``--debug`` shows the traceback instead. Any other exception is a bug: it
prints its traceback and exits with status 1 (docs/errors.md). ``predict`` exits with 1 when some images could not
be read (the others are still printed).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import HmerzooError
from . import data, demo, front, models, recipes
from .common import console as _console
from .recipes import LIST_KINDS  # noqa: F401  (re-exported: the kinds 'hmerzoo list' knows)

# The order is the order of 'hmerzoo --help'.
VERB_MODULES = (recipes, models, data, front, demo)


class IntermixedParser(argparse.ArgumentParser):
    """A verb's parser: options and positionals may come in any order (``train RECIPE --resume auto key=value``),
    as argparse's intermixed parsing allows. Plain argparse takes all positionals in one go, so overrides after an
    option would be "unrecognized arguments"."""

    _intermixed_active = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # parse_known_intermixed_args calls back in here for its two passes; a parser with its own sub-commands
        # (`hmerzoo data ...`) cannot be intermixed and leaves it to them
        if self._intermixed_active or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixed_active = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed_active = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hmerzoo", description="Handwritten Mathematical Expression Recognition zoo")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=IntermixedParser)
    for module in VERB_MODULES:
        module.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # train --nproc-per-node relaunches this command line
    try:
        return int(args.func(args) or 0)
    except HmerzooError as e:
        if args.debug:
            raise
        from rich.markup import escape

        _console().print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # The operating system refused a file (missing, not permitted, disk full): the message names it and why.
        if args.debug:
            raise
        from rich.markup import escape

        what = f"{e.filename}: {e.strerror}" if e.filename is not None and e.strerror else str(e)
        _console().print(f"[bold red]error:[/] {escape(what)} (--debug shows where)", soft_wrap=True)
        return 2
    except Exception as e:
        # Anything else is a bug (in hmerzoo or in a component it ran): the traceback is what a report needs.
        if args.debug:
            raise
        import traceback

        traceback.print_exc()
        print(f"error: unexpected {type(e).__name__}: this is a bug in hmerzoo or in a component it ran, not a "
              "problem with your input; please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
