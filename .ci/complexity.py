"""The complexity gate of ``nox -s lint``: no function of the package above cyclomatic complexity 15.

Complexity is radon's (``radon.complexity.cc_visit`` with its defaults): 1, plus one for each ``if``/
``elif``, conditional expression, loop (and its ``else``), ``except`` (and a ``try``'s ``else``),
``assert``, comprehension ``for``/``if`` and ``match`` case but ``case _``, plus one for each boolean
operator (``a and b or c``: two) -- as ``radon cc`` reports it. Every function
is checked: module-level ones, methods, and nested functions (each on its own: radon does not add a
closure's complexity to its enclosing function's). Classes are not functions: their methods are checked.

    python .ci/complexity.py [--max N] [PATH ...]      (defaults: 15, multixent)

Exits 0 when every function is within the limit; otherwise 1, listing each one above it
(``file:line name complexity``, the most complex first).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from radon.complexity import add_inner_blocks, cc_visit
from radon.visitors import Function


def functions(path: Path) -> Iterator[tuple[Path, Function]]:
    """Every function under ``path`` (a file or a folder of ``*.py``): top level, methods, nested."""
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    for file in files:
        for block in add_inner_blocks(cc_visit(file.read_text(encoding="utf-8"))):
            if isinstance(block, Function):
                yield file, block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("multixent")])
    parser.add_argument("--max", type=int, default=15, help="the highest complexity allowed (default: 15)")
    args = parser.parse_args(argv)
    above = [(f, b) for p in args.paths for f, b in functions(p) if b.complexity > args.max]
    if not above:
        print(f"complexity: every function of {', '.join(map(str, args.paths))} is at {args.max} or below")
        return 0
    above.sort(key=lambda fb: (-fb[1].complexity, str(fb[0]), fb[1].lineno))
    print(f"complexity: {len(above)} function(s) above {args.max}:")
    for file, block in above:
        print(f"  {file}:{block.lineno} {block.fullname} {block.complexity}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
