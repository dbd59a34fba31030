import pytest

from harness.executors.ray import gpus_for_model, ray_home


def test_gpu_rule_from_model_size():
    assert gpus_for_model("Qwen/Qwen3-32B", 8) == 2
    assert gpus_for_model("meta-llama/Meta-Llama-3-8B", 8) == 1
    assert gpus_for_model("meta-llama/Llama-2-70b-hf", 8) == 4
    assert gpus_for_model("mistralai/Mixtral-8x7B-v0.1", 8) == 4  # 56B of experts
    assert gpus_for_model("Qwen/Qwen3-235B-A22B", 4) == 4  # capped by the cluster
    assert gpus_for_model("smollm2-135m", 8) == 1
    assert gpus_for_model("Qwen/Qwen3-32B", 0) == 0  # CPU-only cluster


def test_ray_home_has_local_provider_config():
    from pathlib import Path

    assert "type: local" in (Path(ray_home()) / "ray_bootstrap_config.yaml").read_text()


def test_spec_resources_override_the_rule_and_stay_out_of_run_ids(tmp_path):
    from harness.executors.ray import RayExecutor
    from harness.spec import load_spec

    text = """
name: res
models: [tiny-llama]
methods: [rtn]
schemes: [w4a4]
tasks: [wikitext2]
ppl: {seqlen: 32, max_windows: 1}
scales:
  big: {resources: {num_gpus: 3}}
"""
    path = tmp_path / "s.yaml"
    path.write_text(text)
    plain, big = load_spec(path).cells(), load_spec(path).cells("big")
    assert plain[0].run_ids == big[0].run_ids  # where a cell runs never changes its number's id
    assert big[0].resources == {"num_gpus": 3}
    ex = RayExecutor()
    assert ex._options(big[0], {"CPU": 16, "GPU": 8})["num_gpus"] == 3
    assert ex._options(plain[0], {"CPU": 16, "GPU": 8})["num_gpus"] == 1  # the size rule
    assert ex._options(plain[0], {"CPU": 16, "GPU": 0})["num_gpus"] == 0


def _cell(tmp_path, extra: str = ""):
    from harness.spec import load_spec

    path = tmp_path / "s.yaml"
    path.write_text("name: r\nmodels: [tiny-llama]\nmethods: [rtn]\nschemes: [w4a4]\ntasks: [wikitext2]\n" + extra)
    return load_spec(path).cells()[0]


def test_a_cell_asks_ray_for_its_threads_capped_by_the_node(tmp_path):
    from harness.executors.ray import RayExecutor

    cell = _cell(tmp_path, "threads: 4\n")
    assert cell.threads == 4
    assert RayExecutor()._options(cell, {"CPU": 16, "GPU": 0})["num_cpus"] == 4
    assert RayExecutor()._options(cell, {"CPU": 2, "GPU": 0})["num_cpus"] == 2  # oversubscribed, same numbers
    assert RayExecutor(cpus_per_cell=1)._options(cell, {"CPU": 16, "GPU": 0})["num_cpus"] == 1


@pytest.mark.parametrize("resources, key", [("{num_cpus: 64}", "num_cpus=64"), ("{num_gpus: 1}", "num_gpus=1")])
def test_an_infeasible_resource_request_fails_in_one_line_before_any_work(tmp_path, resources, key):
    """(#11.14) Ray would wait forever for a task no node can hold."""
    from harness.executors.ray import RayExecutor, ResourceError

    cell = _cell(tmp_path, f"resources: {resources}\n")
    with pytest.raises(ResourceError) as err:
        RayExecutor()._options(cell, {"CPU": 2, "GPU": 0})
    assert key in str(err.value) and "largest node" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("resources", ["{num_cpus: -1}", "{num_gpus: -0.5}", "{num_cpus: abc}"])
def test_a_negative_or_non_numeric_resource_is_a_spec_error(tmp_path, resources):
    """(#11.14) A negative request gave Ray's traceback."""
    from harness.spec import SpecError

    with pytest.raises(SpecError) as err:
        _cell(tmp_path, f"resources: {resources}\n")
    assert "resources" in str(err.value) and "\n" not in str(err.value)


def test_bad_resources_key_is_a_one_line_error(tmp_path):
    import pytest

    from harness.spec import SpecError, load_spec

    path = tmp_path / "s.yaml"
    path.write_text("name: r\nmodels: [tiny-llama]\nmethods: [rtn]\nschemes: [w4a4]\ntasks: [wikitext2]\n"
                    "resources: {gpus: 2}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path).cells()
    assert "gpus" in str(err.value) and "\n" not in str(err.value)
