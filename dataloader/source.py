"""A digest of Python source as code: what a change to the code that computes numbers is.

Each text is parsed and its syntax tree dumped without docstrings or line numbers (comments are
not in the tree), so a comment, a docstring or a re-wrapped line leaves the digest as it was, while
an operator, a name or a constant changes it. It names the code version of a run
(`MoMKE/runtime.py`) and the reading rules of the feature cache (`dataloader/cache.py`);
docs/runs.md says what each covers.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

# The modules that read, check and batch the data: what the arrays of the feature cache and a
# run's inputs are computed by.
READING_MODULES = ("batch", "cache", "datasets", "features", "files", "gcnet", "labels", "source")


def _without_docstrings(tree: ast.AST, keep: tuple[str, ...] | None) -> ast.AST:
    """`tree` without docstrings or other bare strings (they compute nothing) and, when `keep`
    is given, with only the top-level definitions and assignments of those names."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [statement for statement in body if not (
                isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
                and isinstance(statement.value.value, str))]
    if keep is not None:
        tree.body = [statement for statement in tree.body if _defined_names(statement) & set(keep)]
    return tree


def _defined_names(statement: ast.stmt) -> set[str]:
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    targets = statement.targets if isinstance(statement, ast.Assign) else \
        [statement.target] if isinstance(statement, ast.AnnAssign) else []
    return {name.id for target in targets for name in ast.walk(target)
            if isinstance(name, ast.Name)}


def source_digest(sources: dict[str, str], keep: dict[str, tuple[str, ...] | None] | None = None
                  ) -> str:
    """A digest of Python source texts (name -> text) as code: each parsed, stripped of
    docstrings (comments are not in the tree) and, for the names in `keep`, of the top-level
    statements not listed there, then dumped without line numbers. A comment or a docstring
    leaves it unchanged; an operator, a name or a constant changes it."""
    digest = hashlib.sha256()
    for name in sorted(sources):
        tree = _without_docstrings(ast.parse(sources[name], filename=name),
                                   (keep or {}).get(name))
        digest.update(f"{name}\n{ast.dump(tree, include_attributes=False)}\n".encode())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def reading_code_version() -> str:
    """The digest of `READING_MODULES`: part of the feature cache's stamp, so arrays read by
    other reading rules are never reused."""
    folder = Path(__file__).resolve().parent
    return source_digest({f"dataloader/{name}.py": (folder / f"{name}.py").read_text(
        encoding="utf-8") for name in READING_MODULES})
