"""Every spec shipped in experiments/ expands at every scale, and every paper claim names methods and
schemes that some scale of its spec runs (a typo in a label would otherwise only show as "not run")."""
import ast
from pathlib import Path

import pytest
import yaml

from harness.report.claims import METRIC_OF
from harness.spec import load_spec

ROOT = Path(__file__).resolve().parents[2] / "experiments"
SPECS = sorted(ROOT.glob("*.yaml")) + sorted((ROOT / "papers").glob("*.yaml"))


def scales_of(path: Path) -> list[str | None]:
    data = yaml.safe_load(path.read_text())
    return ([None] if data.get("models") else []) + list(data.get("scales") or {})


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_expands_at_every_scale(path):
    for scale in scales_of(path):
        cells = load_spec(path).cells(scale=scale)
        assert cells, f"{path.name} scale {scale}: no cells"


def claim_terms(check: str) -> list[tuple[str, str]]:
    """(method label, scheme) of every ppl/acc/kl/metric term of a claim."""
    out = []
    for node in ast.walk(ast.parse(check, mode="eval")):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (*METRIC_OF, "metric"):
            args = [ast.unparse(a).strip("'\"") for a in node.args]
            out.append(tuple(args[-2:]))
    return out


PAPERS = sorted((ROOT / "papers").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPERS, ids=[p.stem for p in PAPERS])
def test_claims_name_cells_the_spec_runs(path):
    claims = yaml.safe_load(path.read_text()).get("claims") or []
    assert claims, f"{path.name} has no claims"
    runnable = {(c.method_label, c.scheme_name) for scale in scales_of(path)
                for c in load_spec(path).cells(scale=scale)}
    for claim in claims:
        terms = claim_terms(claim["check"])
        assert terms, f"{claim['id']}: no ppl/acc/kl/metric term"
        for method, scheme in terms:
            assert (method, scheme) in runnable, f"{path.name} claim {claim['id']}: no scale runs {method} on {scheme}"
