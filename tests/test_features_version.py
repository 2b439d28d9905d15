"""The cache key carries `FEATURES_VERSION`; this test holds it to the code that computes features.

`features_code.json` records the version and a hash of each piece of code that decides feature values
(tokenisation and batching, tap placement, pooling, early exit, compute precision). The hashes are of the
code's syntax tree without docstrings, so comments, docstrings and formatting do not count. When the test
fails, the code changed; then, on purpose, either

- the change alters feature values: bump `FEATURES_VERSION` in layerfusion/features/extraction.py (old
  cache entries are then not used), and record; or
- it alters none (a refactor): record only, and users' caches stay valid.

Record with: LAYERFUSION_RECORD_FEATURES_CODE=1 .venv/bin/python -m pytest -q tests/test_features_version.py
Code that moves or is renamed: edit `CODE` below, then record.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import os
from pathlib import Path

import pytest

import layerfusion.features.cache as cache_mod
from layerfusion.features.extraction import FEATURES_VERSION

RECORD = Path(__file__).with_name("features_code.json")
CODE = {  # module -> the names in it that compute features (None: the whole module)
    "layerfusion.features.extraction": ["extract_chunk"],
    "layerfusion.encoders.forward": None,
    "layerfusion.encoders.taps": None,
    "layerfusion.encoders.frozen": [
        "FrozenEncoder.forward",
        "FrozenEncoder.compute_context",
        "tap_modules",
        "set_mpnet_sdpa",
        "_mpnet_sdpa_forward",
        "blocks_of",
        "_cuda_fp32",
        "DECODERS",
    ],
    "layerfusion.encoders.precision": ["resolve_compute_dtype", "NO_AUTOCAST"],
}


def code_hash(node: ast.AST) -> str:
    """SHA-256 of a syntax tree without its docstrings (comments and layout are not in the tree)."""
    node = ast.parse(ast.unparse(node))  # a copy
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if (
            isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            n.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(node).encode()).hexdigest()


def _find(tree: ast.Module, dotted: str) -> ast.AST:
    scope: list[ast.stmt] = tree.body
    found = None
    for part in dotted.split("."):
        found = next(
            (
                n
                for n in scope
                if getattr(n, "name", None) == part
                or (
                    isinstance(n, (ast.Assign, ast.AnnAssign))
                    and part
                    in [
                        t.id
                        for t in (getattr(n, "targets", None) or [n.target])
                        if hasattr(t, "id")
                    ]
                )
            ),
            None,
        )
        if found is None:
            raise LookupError(dotted)
        scope = getattr(found, "body", [])
    return found


def current_hashes() -> dict[str, str]:
    """The hash of every piece of code in `CODE`, by `module:name`."""
    out = {}
    for module, names in CODE.items():
        tree = ast.parse(inspect.getsource(importlib.import_module(module)))
        for name in names or [None]:
            try:
                node = tree if name is None else _find(tree, name)
            except LookupError:
                pytest.fail(f"{module} has no {name}: edit CODE in {__file__}, then record")
            out[module if name is None else f"{module}:{name}"] = code_hash(node)
    return out


def test_the_code_that_computes_features_is_the_recorded_one():
    current = {"features_version": FEATURES_VERSION, "code": current_hashes()}
    if os.environ.get("LAYERFUSION_RECORD_FEATURES_CODE"):
        RECORD.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(RECORD.read_text())
    changed = sorted(
        k
        for k in {*current["code"], *recorded["code"]}
        if current["code"].get(k) != recorded["code"].get(k)
    )
    assert recorded == current, (
        f"code that computes features changed: {changed or 'none'}; FEATURES_VERSION is "
        f"{FEATURES_VERSION}, recorded {recorded['features_version']}. Bump FEATURES_VERSION if feature "
        "values change, then record: see the docstring of tests/test_features_version.py"
    )


def test_the_hash_sees_numeric_changes_and_ignores_comments_and_docstrings():
    base = ast.parse('def f(x):\n    """Doc."""\n    return x.mean(1)\n')
    same = ast.parse("def f(x):\n    # a comment\n    return x.mean(\n        1\n    )\n")
    numeric = ast.parse('def f(x):\n    """Doc."""\n    return x.mean(0)\n')
    assert code_hash(base) == code_hash(same) != code_hash(numeric)


def test_the_features_version_is_in_the_key_and_the_entry_path(tiny_models, monkeypatch):
    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder

    encoder = FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))
    cache = cache_mod.FeatureCache("unused")
    key = cache.key(encoder, ["a text"], "train")
    assert key["features"] == FEATURES_VERSION
    monkeypatch.setattr(cache_mod, "FEATURES_VERSION", FEATURES_VERSION + 1)
    bumped = cache.key(encoder, ["a text"], "train")
    assert bumped["features"] == FEATURES_VERSION + 1
    assert cache.entry_dir(bumped) != cache.entry_dir(key)
