"""Size figures of the library code: lines of code, longest classes and functions (docs/architecture.md).

    python bench/code_stats.py [ROOT] [--top N]

Reads every ``*.py`` under ROOT/tagger and ROOT/jobs (default ROOT: the current folder), as text; runs nothing.

- code lines: lines holding a token other than a comment (``tokenize``): blank and comment-only lines left
  out; docstring lines are counted, and also given apart (lines covered by a module, class or function
  docstring), so ``code - docstrings`` is the statements alone;
- a class or function's length: ``end_lineno - lineno + 1`` of its ``ast`` node, decorators left out
  (nested functions count on their own too, with their qualified name).
"""

from __future__ import annotations

import argparse
import ast
import io
import tokenize
from pathlib import Path

SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}


def code_lines(text: str) -> set[int]:
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in SKIP:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def definitions(tree: ast.AST, path: str):
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                yield kind, child.end_lineno - child.lineno + 1, f"{path}:{child.lineno} {name}"
                yield from walk(child, name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=".")
    parser.add_argument("--top", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.root)
    files = sorted(p for top in ("tagger", "jobs") for p in (root / top).rglob("*.py") if "__pycache__" not in p.parts)
    total = docs = 0
    defs = []
    for path in files:
        text = path.read_text()
        tree = ast.parse(text)
        code = code_lines(text)
        total += len(code)
        docs += len(code & docstring_lines(tree))
        defs.extend(definitions(tree, str(path.relative_to(root))))
    print(f"files: {len(files)}")
    print(f"code lines (non-blank, non-comment): {total}  of which docstrings: {docs}  statements alone: {total - docs}")
    for kind in ("class", "function"):
        longest = sorted((d for d in defs if d[0] == kind), key=lambda d: -d[1])[: args.top]
        for _, length, where in longest:
            print(f"longest {kind}: {length} lines  {where}")


if __name__ == "__main__":
    main()
