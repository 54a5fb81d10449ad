"""orchestrator/config.py and orchestrator/cli.py: shipped configs load, overrides apply, every error names
its dotted key, every field is documented, and docs/configuration.md matches the schema."""

from __future__ import annotations

import dataclasses
import glob
import os
import textwrap
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.config import ConfigError, OdpoConfig, field_docs, load_config, validate

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(glob.glob(str(REPO / "configs" / "*.yaml")) + glob.glob(str(REPO / "examples" / "*" / "*.yaml"))
                 + glob.glob(str(REPO / "tests" / "user_task" / "*.yaml")))
TINY = "configs/tiny.yaml"


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    """configs/tiny.yaml names configs/data/tiny_prompts.jsonl relative to the repository root."""
    monkeypatch.chdir(REPO)


def config_error(path, overrides=(), check_machine: bool = True) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), check_machine=check_machine)
    return info.value


def write_yaml(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


VALID_YAML = f"""\
run:
  name: t
policy:
  path: builtin:tiny-llama
data:
  path: {REPO / "configs" / "data" / "tiny_prompts.jsonl"}
scorer:
  function: actors.rewards:lowercase_ratio
"""


# ---------------------------------------------------------------------------------------------
# The shipped configs


def test_configs_are_found():
    assert str(REPO / TINY) in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, OdpoConfig)
    validate(cfg)  # idempotent: a loaded config validates again
    assert cfg.generator.n % len(cfg.generator.temperatures) == 0
    assert cfg.learner.global_batch_size % (cfg.learner.num_ranks * cfg.learner.micro_batch_size) == 0


def test_tiny_config_values():
    cfg = load_config(TINY)
    assert cfg.run.name == "tiny"
    assert cfg.policy.path == "builtin:tiny-llama"
    assert cfg.generator.n == 8
    assert cfg.generator.temperatures == [1.0, 0.7]
    assert cfg.learner.lr == pytest.approx(2.0e-3)
    # a field the YAML does not set keeps the schema default
    assert cfg.learner.label_smoothing == 0.0


def test_valid_tmp_yaml_loads(tmp_path):
    cfg = load_config(write_yaml(tmp_path, VALID_YAML))
    assert cfg.run.name == "t"
    assert cfg.run.rounds == 3  # default


# ---------------------------------------------------------------------------------------------
# Overrides


def test_overrides_take_effect():
    cfg = load_config(TINY, ["learner.lr=1e-6", "generator.temperatures=[1.0,0.7]", "run.rounds=2"])
    assert cfg.learner.lr == pytest.approx(1e-6)
    assert cfg.generator.temperatures == [1.0, 0.7]
    assert cfg.run.rounds == 2
    cfg = load_config(TINY, ["generator.temperatures=[0.5]", "generator.n=3"])
    assert cfg.generator.temperatures == [0.5]
    assert cfg.generator.n == 3


def test_later_override_wins():
    cfg = load_config(TINY, ["run.rounds=2", "run.rounds=5"])
    assert cfg.run.rounds == 5


def test_overrides_without_a_file(tmp_path):
    data = REPO / "configs" / "data" / "tiny_prompts.jsonl"
    cfg = load_config(None, ["policy.path=builtin:tiny-llama", f"data.path={data}",
                             "scorer.function=actors.rewards:lowercase_ratio"])
    assert cfg.policy.path == "builtin:tiny-llama"
    assert cfg.data.path == str(data)


# ---------------------------------------------------------------------------------------------
# Errors name the dotted key


def test_unknown_top_level_key_in_yaml(tmp_path):
    e = config_error(write_yaml(tmp_path, VALID_YAML + "trainer:\n  lr: 1\n"))
    assert e.key == "trainer"
    assert "`trainer`" in str(e) and "unknown key" in str(e)
    assert "learner" in str(e)  # lists what is allowed


def test_unknown_nested_key_in_yaml(tmp_path):
    e = config_error(write_yaml(tmp_path, VALID_YAML + "learner:\n  lrr: 1.0e-6\n"))
    assert e.key == "learner.lrr"
    assert "`learner.lrr`" in str(e) and "unknown key" in str(e)
    assert "lr" in str(e)


def test_unknown_override_key():
    e = config_error(TINY, ["learner.lrr=1"])
    assert e.key == "learner.lrr"
    assert "`learner.lrr`" in str(e)
    assert "unknown key `lrr`" in str(e)


def test_unknown_override_section():
    e = config_error(TINY, ["trainer.lr=1"])
    assert e.key == "trainer.lr"
    assert "unknown key `trainer`" in str(e)


def test_override_without_equals():
    e = config_error(TINY, ["learner.lr"])
    assert e.key == "learner.lr"
    assert "key=value" in str(e)


def test_override_of_wrong_type():
    e = config_error(TINY, ["generator.n=abc"])
    assert e.key == "generator.n"
    assert "abc" in str(e)


def test_generator_n_below_two():
    e = config_error(TINY, ["generator.n=1"])
    assert e.key == "generator.n"
    assert ">= 2" in str(e)


def test_temperatures_must_divide_n():
    e = config_error(TINY, ["generator.n=4", "generator.temperatures=[1.0,0.7,0.5]"])
    assert e.key == "generator.temperatures"
    assert "n=4" in str(e) and "3 temperatures" in str(e)


def test_global_batch_must_be_a_multiple_of_ranks_times_micro():
    e = config_error(TINY, ["learner.num_ranks=2", "learner.micro_batch_size=4", "learner.global_batch_size=12"])
    assert e.key == "learner.global_batch_size"
    assert "2 x 4 = 8" in str(e) and "12" in str(e)
    # 16 = 2 x 4 x 2 is fine
    cfg = load_config(TINY, ["learner.num_ranks=2", "learner.micro_batch_size=4", "learner.global_batch_size=16"])
    assert cfg.learner.global_batch_size == 16


def test_missing_model_path():
    e = config_error(TINY, ["policy.path=./does/not/exist"])
    assert e.key == "policy.path"
    assert "does not exist" in str(e) and "./does/not/exist" in str(e)


def test_unknown_builtin():
    e = config_error(TINY, ["policy.path=builtin:gpt-9"])
    assert e.key == "policy.path"
    assert "unknown builtin `gpt-9`" in str(e) and "tiny-llama" in str(e)


def test_missing_data_path():
    e = config_error(TINY, ["data.path=configs/data/missing.jsonl"])
    assert e.key == "data.path"
    assert "configs/data/missing.jsonl" in str(e)
    e = config_error(TINY, ["data.path=./missing.jsonl"])
    assert e.key == "data.path"


def test_length_penalty_needs_max_min_p():
    e = config_error(TINY, ["pairs.length_penalty=0.1"])
    assert e.key == "pairs.length_penalty"
    assert "max_min_p" in str(e)
    cfg = load_config(TINY, ["pairs.length_penalty=0.1", "pairs.strategy=max_min_p"])
    assert cfg.pairs.length_penalty == pytest.approx(0.1)


def test_unknown_loss():
    e = config_error(TINY, ["learner.loss=foo"])
    assert e.key == "learner.loss"
    assert "'foo'" in str(e) and "sigmoid" in str(e) and "ipo" in str(e)


def test_unknown_reference():
    e = config_error(TINY, ["learner.reference=foo"])
    assert e.key == "learner.reference"
    assert "fixed" in str(e) and "previous" in str(e)


def test_staleness_is_zero_or_one_and_online_only():
    e = config_error(TINY, ["run.staleness=2"])
    assert e.key == "run.staleness" and "got 2" in str(e) and "one-step-off-policy" in str(e)
    e = config_error(TINY, ["run.staleness=1", "run.mode=offline"])
    assert e.key == "run.staleness" and "run.mode=online" in str(e)


def test_dtype_auto_is_bfloat16_only_where_the_hardware_computes_it_fast(monkeypatch):
    from orchestrator import config

    monkeypatch.setattr(config, "cpu_flags", lambda: {"avx2", "fma"})  # an AVX2-only CPU
    assert load_config(TINY, ["policy.dtype=auto"]).policy.dtype == "float32"
    assert load_config(TINY, ["policy.dtype=auto", "learner.gpus_per_rank=1"]).policy.dtype == "bfloat16"
    monkeypatch.setattr(config, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16"})
    assert load_config(TINY, ["policy.dtype=auto"]).policy.dtype == "bfloat16"
    assert load_config(TINY, ["policy.dtype=auto"], check_machine=False).policy.dtype == "auto"  # resolved where it runs
    assert "policy.dtype" in str(config_error(TINY, ["policy.dtype=fp8"]))


def test_a_variant_names_its_base_and_states_only_what_differs(tmp_path):
    armo = load_config("configs/rlhflow_llama3_8b_armorm.yaml", check_machine=False)
    recipe = load_config("configs/rlhflow_llama3_8b.yaml", check_machine=False)
    assert (armo.scorer.model_path, armo.scorer.output_field, armo.scorer.trust_remote_code) == (
        "RLHFlow/ArmoRM-Llama3-8B-v0.1", "score", False)  # its code runs only when the user sets it true
    assert armo.learner == recipe.learner and armo.generator == recipe.generator and armo.run.name != recipe.run.name
    assert armo.scorer.num_actors == recipe.scorer.num_actors == 4  # kept from the base's section
    pairwise = load_config("configs/rlhflow_llama3_8b_pairwise.yaml", check_machine=False)
    assert pairwise.scorer.type == "pairwise" and pairwise.data == recipe.data
    (tmp_path / "a.yaml").write_text("base: b.yaml\nrun: {name: a}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    e = config_error(str(tmp_path / "a.yaml"))
    assert e.key == "base" and "a.yaml -> " in str(e) and "b.yaml" in str(e)
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    assert "no such config file" in str(config_error(str(tmp_path / "c.yaml"))) and "the base of" in str(
        config_error(str(tmp_path / "c.yaml")))


def test_zero_stage_out_of_range():
    e = config_error(TINY, ["learner.zero_stage=4"])
    assert e.key == "learner.zero_stage"
    assert "got 4" in str(e)


def test_malformed_yaml(tmp_path):
    path = write_yaml(tmp_path, "run:\n  name: [unclosed\n")
    e = config_error(path)
    assert e.key == "CONFIG"
    assert "not valid YAML" in str(e) and path in str(e)


def test_yaml_that_is_a_list(tmp_path):
    path = write_yaml(tmp_path, "- run\n- policy\n")
    e = config_error(path)
    assert e.key == "CONFIG"
    assert "mapping" in str(e) and "list" in str(e)


def test_missing_config_file(tmp_path):
    e = config_error(str(tmp_path / "nope.yaml"))
    assert e.key == "CONFIG"
    assert "no such config file" in str(e)


def test_missing_required_policy_path(tmp_path):
    text = VALID_YAML.replace("policy:\n  path: builtin:tiny-llama\n", "")
    assert "policy" not in text
    e = config_error(write_yaml(tmp_path, text))
    assert e.key == "policy.path"
    assert "required" in str(e)


def test_section_given_a_scalar(tmp_path):
    e = config_error(write_yaml(tmp_path, VALID_YAML + "learner: 5\n"))
    assert e.key == "learner"
    assert "section" in str(e)


def test_config_error_is_a_value_error_with_key():
    e = ConfigError("a.b", "bad")
    assert isinstance(e, ValueError)
    assert e.key == "a.b"
    assert str(e) == "config error at `a.b`: bad"


# ---------------------------------------------------------------------------------------------
# Documentation


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if dataclasses.is_dataclass(value):
            keys += _leaf_keys(type(value), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_field_docs_documents_every_leaf_field():
    rows = field_docs()
    keys = [key for key, _, _, _ in rows]
    assert keys == _leaf_keys(OdpoConfig)
    assert len(keys) == len(set(keys))
    undocumented = [key for key, _, _, doc in rows if not doc.strip()]
    assert undocumented == []
    by_key = {key: (typ, default, doc) for key, typ, default, doc in rows}
    assert by_key["policy.path"][1] == "(required)"
    assert by_key["data.path"][1] == "(required)"
    assert by_key["learner.beta"][1] == "0.1"
    assert "beta" in by_key["learner.beta"][2].lower()


def test_cli_validate_prints_resolved_yaml(capsys):
    assert cli.main(["validate", TINY, "run.rounds=2"]) == 0
    out = capsys.readouterr().out
    assert "rounds: 2" in out
    assert "rounds: 6" not in out
    assert "name: tiny" in out


def test_cli_bad_override_returns_2_and_names_the_key(capsys):
    assert cli.main(["validate", TINY, "learner.lrr=1"]) == 2
    captured = capsys.readouterr()
    assert "learner.lrr" in captured.err
    assert captured.out == ""


def test_cli_invalid_value_returns_2(capsys):
    assert cli.main(["validate", TINY, "generator.n=1"]) == 2
    assert "generator.n" in capsys.readouterr().err


def test_cli_config_docs_prints_the_reference(capsys):
    assert cli.main(["config-docs"]) == 0
    out = capsys.readouterr().out
    assert out == cli.configuration_markdown()
    assert out.startswith("# Configuration reference\n")
    for key in _leaf_keys(OdpoConfig):
        assert f"| `{key}` |" in out, key


def test_docs_configuration_md_matches_schema():
    path = REPO / "docs" / "configuration.md"
    hint = "run `.venv/bin/odpo config-docs > docs/configuration.md`"
    assert path.is_file(), f"docs/configuration.md is missing: {hint}"
    assert path.read_text() == cli.configuration_markdown(), f"docs/configuration.md is out of date: {hint}"


def test_cli_prints_input_errors_in_one_line_and_keeps_the_traceback_of_anything_else(tmp_path, monkeypatch, capsys):
    import ray.exceptions

    from orchestrator import cli, driver

    monkeypatch.chdir(REPO)
    # input the user can fix (a checkpoint that is not there): one line on stderr, exit status 2
    assert cli.main(["eval", str(tmp_path / "missing"), TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("odpo: ") and "is not a checkpoint" in err and "Traceback" not in err
    # an actor's ValueError as Ray re-raises it in the driver (a RayTaskError that is also a ValueError),
    # injected in place of the run: it reaches the caller whole, with its traceback
    from_actor = ray.exceptions.RayTaskError("Scorer.score", "Traceback ...", ValueError("bad reward")).as_instanceof_cause()
    assert isinstance(from_actor, ValueError)

    def failing_run(cfg):
        raise from_actor

    monkeypatch.setattr(driver, "run", failing_run)
    with pytest.raises(ValueError) as raised:
        cli.main(["run", TINY, f"run.output_dir={tmp_path}"])
    assert raised.value is from_actor


@pytest.mark.parametrize("overrides,key,words", [
    (["learner.lora.rank=-1"], "learner.lora.rank", "must be >= 0"),
    (["learner.lora.rank=4", "learner.lora.alpha=0"], "learner.lora.alpha", "must be > 0"),
    (["learner.lora.rank=4", "learner.lora.dropout=1.0"], "learner.lora.dropout", "[0, 1)"),
    (["learner.lora.rank=4", "learner.lora.target_modules=[]"], "learner.lora.target_modules", "[all-linear]"),
    (["learner.lora.rank=4", "learner.reference=previous"], "learner.lora.rank", "learner.reference must be fixed"),
    (["learner.lora.rank=4", "learner.lora.sync=adapters"], "learner.lora.sync", "auto, adapter or merged"),
    (["learner.lora.rank=4", "learner.lora.sync=adapter", "generator.backend=hf"], "learner.lora.sync",
     "learner.lora.sync=merged"),
    (["learner.lora.rank=600", "learner.lora.sync=adapter"], "learner.lora.rank", "rank up to 512"),
])
def test_bad_lora_settings_stop_at_validation(overrides, key, words):
    e = config_error(TINY, overrides)
    assert e.key == key and words in str(e)


def test_lora_settings_load():
    cfg = load_config(TINY, ["learner.lora.rank=8", "learner.lora.target_modules=[q_proj,v_proj]"])
    assert (cfg.learner.lora.rank, cfg.learner.lora.alpha, cfg.learner.lora.target_modules) == (8, 16.0, ["q_proj", "v_proj"])
    assert load_config(TINY).learner.lora.rank == 0  # no adapters unless asked


@pytest.mark.parametrize("overrides,adapters", [
    ([], False),  # no adapters
    (["learner.lora.rank=8"], False),  # auto: CPU generators take merged weights (vLLM's CPU LoRA is slow)
    (["learner.lora.rank=8", "generator.gpus_per_actor=1", "generator.backend=vllm"], True),  # auto on GPUs
    (["learner.lora.rank=8", "generator.gpus_per_actor=1", "generator.backend=hf"], False),
    (["learner.lora.rank=8", "generator.gpus_per_actor=1", "generator.backend=vllm", "learner.lora.sync=merged"], False),
    (["learner.lora.rank=8", "learner.lora.sync=adapter"], True),
])
def test_which_runs_sync_only_their_adapters(overrides, adapters):
    from orchestrator.config import syncs_adapters

    assert syncs_adapters(load_config(TINY, overrides, check_machine=False)) is adapters


def test_an_adapter_rank_maps_to_the_vllm_engine_rank_that_holds_it():
    from actors.settings import vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 4, 16, 17, 512, 513)] == [1, 8, 16, 32, 512, None]


def test_adapters_and_nccl_do_not_mix():
    e = config_error(TINY, ["learner.lora.rank=4", "learner.lora.sync=adapter", "generator.backend=vllm",
                            "generator.gpus_per_actor=1", "learner.gpus_per_rank=1", "generator.weight_sync=nccl"],
                     check_machine=False)
    assert e.key == "learner.lora.sync" and "object store" in str(e)
