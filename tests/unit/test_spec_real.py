"""Spec validation against the real catalogs (models, schemes, formats, tasks, methods)."""
import pytest

from harness.errors import PtqbenchError
from harness.spec import load_spec

BASE = """
models: [tiny-llama]
methods: [fp, rtn, gptq]
schemes: [w4a16_g128, w4a4, mxfp4, nvfp4]
tasks: [wikitext2, {name: piqa, limit: 20}, kl]
calib: {corpus: c4, n: 4, seqlen: 64}
"""

BAD = [
    ("unknown_scheme", BASE.replace("w4a4,", "w4a5,"), ["'w4a5'", "w4a16_g128", "nvfp4"]),
    ("unknown_format", BASE.replace("w4a4,", "{name: mine, weight: fp5},"), ["'fp5'", "mxfp4", "int4"]),
    ("wrong_bits", BASE.replace("w4a4,", "{name: mine, weight: int33},"), ["33", "2..16"]),
    ("unknown_scheme_key", BASE.replace("w4a4,", "{name: mine, wieght: int4},"), ["'wieght'", "weight", "activation"]),
    ("unknown_model", BASE.replace("tiny-llama", "smollm2-13m"), ["'smollm2-13m'", "smollm2-135m", "tiny-llama"]),
    ("unknown_task", BASE.replace("wikitext2,", "wikitext-2,"), ["'wikitext-2'", "wikitext2", "piqa"]),
    ("unknown_method", BASE.replace("gptq]", "gptq, awk]"), ["'awk'", "choose one of:", "awq", "fp", "gptq", "rtn"]),
    ("gptq_damp", BASE.replace("gptq]", "{name: gptq, params: {damp: -1}}]"), ["damp=-1", "greater than 0", "block_size"]),
    ("gptq_act_order", BASE.replace("gptq]", "{name: gptq, params: {act_order: maybe}}]"), ["act_order='maybe'", "bool"]),
    ("calib_corpus", BASE.replace("corpus: c4", "corpus: pile"), ["'pile'", "c4, wikitext2"]),
    ("kl_dataset", BASE.replace("kl]", "{name: kl, dataset: piqa}]"), ["'piqa'", "wikitext2, c4, ptb"]),
    ("lm_eval_setting", BASE.replace("limit: 20", "limt: 20"), ["'limt'", "limit, num_fewshot"]),
]


@pytest.mark.parametrize("case, text, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_against_real_catalogs(tmp_path, case, text, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(PtqbenchError) as info:
        load_spec(path).cells()
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_real_spec_expands(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(BASE)
    cells = load_spec(path).cells()
    assert len(cells) == 1 + 4 + 4
    gptq = [c for c in cells if c.method == "gptq"]
    # w4a16_g128 and w4a4 have different weight formats (int4_g128 vs int4): four calibrations
    assert len({c.calib_key for c in gptq}) == 4
    assert gptq[0].model_source["kind"] == "tiny"
    assert all(c.run_ids["piqa"] != c.run_ids["wikitext2"] for c in cells)
