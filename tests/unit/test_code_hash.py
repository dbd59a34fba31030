"""The code that computes a number is part of its run id (#20.2): a change to a method's code, or to the
engine it runs through, gives new ids; comments, docstrings and unrelated modules do not."""
from __future__ import annotations

import importlib
import sys

import pytest

from harness.spec import code

METHOD = '''
"""A toy method for the code-hash test."""
from harness.method import Method
from toy_codehash_pkg.helper import scale


class ToyCodeHash(Method):
    needs_calibration = False
    uses_scheme = False

    def apply(self, model, adapter, state, scheme):
        # a comment
        return scale(model)
'''
HELPER = '''
def scale(model):
    return model
'''


@pytest.fixture
def package(tmp_path, monkeypatch):
    pkg = tmp_path / "toy_codehash_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "method.py").write_text(METHOD)
    (pkg / "helper.py").write_text(HELPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield pkg
    for name in [m for m in sys.modules if m.startswith("toy_codehash_pkg")]:
        del sys.modules[name]


def fresh_hash(module: str = "toy_codehash_pkg.method") -> str:
    for cached in (code.code_hash, code._module_digest, code._parsed, code.module_path, code._package_dir):
        cached.cache_clear()
    return code.method_code_hash(module)


def test_the_closure_follows_imports_into_the_method_package_and_the_engine(package):
    names = code.closure(["toy_codehash_pkg.method", code.ENGINE], {"harness", "toy_codehash_pkg"})
    assert {"toy_codehash_pkg.method", "toy_codehash_pkg.helper", "harness.runner", "harness.eval.ppl",
            "harness.quant.layers"} <= set(names)
    # modules that only store, name or print numbers are not hashed
    assert not {"harness.store", "harness.report", "harness.cli", "harness.tracking"} & set(names)


def test_a_code_change_changes_the_hash_and_a_comment_does_not(package):
    before = fresh_hash()
    (package / "method.py").write_text(METHOD.replace("# a comment", "# another comment").replace(
        '"""A toy method for the code-hash test."""', '"""Reworded docstring."""'))
    assert fresh_hash() == before
    (package / "helper.py").write_text(HELPER.replace("return model", "return model.half()"))
    assert fresh_hash() != before  # a change in an imported helper counts too


def test_a_code_change_gives_new_run_ids(package, tmp_path):
    from harness import registry
    from harness.spec import load_spec

    module = importlib.import_module("toy_codehash_pkg.method")
    registry.register_method("toy_codehash")(module.ToyCodeHash)
    try:
        spec = tmp_path / "s.yaml"
        spec.write_text("name: c\nmodels: [tiny-llama]\nmethods: [toy_codehash]\nschemes: [w4a4]\ntasks: [wikitext2]\n")

        def ids():
            fresh_hash()
            return load_spec(spec).cells()[0].run_ids

        first = ids()
        assert ids() == first
        (package / "helper.py").write_text(HELPER.replace("return model", "return model.float()"))
        assert ids() != first
    finally:
        registry._METHODS.pop("toy_codehash", None)


def test_shipped_methods_hash_their_own_module():
    assert code.method_code_hash("methods.gptq") != code.method_code_hash("methods.rtn")
    assert "methods.gptq" in code.closure(["methods.gptq"]) and "methods.rtn" not in code.closure(["methods.gptq"])
