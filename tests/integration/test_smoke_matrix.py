"""experiments/smoke.yaml on SmolLM2-135M at a reduced scale: the engine end to end on a real model.

rtn and gptq under INT4 g64 weights and MXFP4 (weights + activations), one short WikiText-2
perplexity each: GPTQ must beat round-to-nearest in both, and a rerun must be a no-op.

It is also the golden test of the shipped examples (#20.2): these four cells are cells of the committed
`results/examples/smoke`; each must be there under the run id the current code gives it (a run id hashes
the code that computes it, so a code change that forgot `make examples` fails here), with the same
numbers bit for bit (a number that moved under an unchanged id fails here).
"""
from pathlib import Path

import pytest
import yaml

from harness.driver import run_matrix
from harness.spec import load_spec
from harness.store import Store, load_results

pytestmark = pytest.mark.integration

SMOKE = Path(__file__).resolve().parents[2] / "experiments" / "smoke.yaml"
EXAMPLES = Path(__file__).resolve().parents[2] / "results" / "examples" / "smoke"


def test_smoke_subset_gptq_beats_rtn(tmp_path):
    data = yaml.safe_load(SMOKE.read_text())
    data["include"] = [{"method": ["rtn", "gptq"], "scheme": ["w4a16_g64", "mxfp4"]}]
    spec_path = tmp_path / "smoke_subset.yaml"
    spec_path.write_text(yaml.safe_dump(data))

    cells = load_spec(spec_path).cells("smoke")
    assert sorted((c.method, c.scheme_name) for c in cells) == [
        ("gptq", "mxfp4"), ("gptq", "w4a16_g64"), ("rtn", "mxfp4"), ("rtn", "w4a16_g64")]
    store = Store(tmp_path / "results")
    summary = run_matrix(cells, store)
    assert summary.failed == 0, summary.failures

    df = load_results(store.root)
    ppl = df[df.metric == "ppl"].set_index(["method", "scheme"])["value"]
    for scheme in ("w4a16_g64", "mxfp4"):
        assert ppl[("gptq", scheme)] < ppl[("rtn", scheme)], ppl.to_dict()
    calib = df[(df.metric == "calib_seconds") & (df.method == "gptq")]
    assert len(calib) == 2 and (calib.value > 0).all()
    assert set(df["model_source.sha256"].dropna()) and set(df["calib.n"].dropna()) == {16}

    again = run_matrix(load_spec(spec_path).cells("smoke"), store)
    assert again.skipped == 4 and again.done == again.failed == 0

    shipped = Store(EXAMPLES)
    for record in store.records():
        example = shipped.get(record["run_id"])
        assert example is not None, (f"results/examples/smoke has no run {record['run_id']} ({record['method']} "
                                     f"{record['scheme']}): the code behind it changed; regenerate with `make examples`")
        assert example["metrics"]["ppl"] == record["metrics"]["ppl"], (record["method"], record["scheme"])
        assert example["metrics"]["nll"] == record["metrics"]["nll"]
