"""A user's own task: functions found next to the config in every process, checked before anything starts,
failures that name the function and the prompt; tied prompts counted and sampled again; the statistics every
held-out figure is reported with. Unit tests (no Ray) except where marked slow."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO

from actors.types import Prompt, Response, Rollout
from actors.user_code import CODE_PATH_ENV, RewardFn, UserFunctionError, code_path_for, import_function
from orchestrator import stats
from orchestrator.config import ConfigError, load_config
from orchestrator.report import pairs_line
from orchestrator.selection import make_pairs, tie_kinds
from orchestrator.streaming import Resampler

# ---------------------------------------------------------------------------------------------------------
# statistics, by hand


def test_t_quantiles_match_the_table():
    for df, table in ((1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042), (31, 2.040), (60, 2.000), (120, 1.980)):
        assert stats.t95(df) == pytest.approx(table, abs=2e-3)


def test_intervals_take_the_prompt_as_the_unit_and_pair_the_change():
    # 3 prompts x 2 samples: prompt means 1.0, 0.5, 0.0 -> mean 0.5, sd 0.5, half = t(2) * 0.5 / sqrt(3)
    now = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    before = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    groups = [7, 7, 8, 8, 9, 9]
    mean, half = stats.clustered(now, groups)
    assert mean == pytest.approx(0.5) and half == pytest.approx(4.303 * 0.5 / math.sqrt(3))
    # per-prompt changes 0.5, 0.5, 0.0: mean 1/3, sd sqrt(1/12)
    change, change_half = stats.paired_change(now, before, groups)
    assert change == pytest.approx(1 / 3)
    assert change_half == pytest.approx(4.303 * math.sqrt(1 / 12) / math.sqrt(3))
    # the paired interval is narrower than the unpaired one when prompts differ in difficulty
    rng = np.random.default_rng(0)
    difficulty = np.repeat(rng.uniform(0, 1, 40), 4)
    a = (rng.uniform(0, 1, 160) < difficulty).astype(float)
    b = (rng.uniform(0, 1, 160) < np.clip(difficulty + 0.1, 0, 1)).astype(float)
    g = np.repeat(np.arange(40), 4)
    assert stats.paired_change(b, a, g)[1] < math.hypot(stats.clustered(a, g)[1], stats.clustered(b, g)[1])
    assert math.isnan(stats.mean_ci([1.0])[1]) and stats.signed_interval(0.2, 0.05) == "+0.200 [+0.150, +0.250]"


# ---------------------------------------------------------------------------------------------------------
# ties: why a prompt gave no pair, and sampling it again


def rollout(uid: int, texts: list[str]) -> Rollout:
    return Rollout(prompt=Prompt(uid=uid, messages=[{"role": "user", "content": f"q{uid}"}]), prompt_text="q",
                   prompt_ids=[1], weight_version=0,
                   responses=[Response(text=t, token_ids=[2 + i], temperature=1.0, finished=True)
                              for i, t in enumerate(texts)])


def test_ties_are_split_into_all_right_and_all_wrong():
    rollouts = [rollout(0, ["a", "b"]), rollout(1, ["c", "d"]), rollout(2, ["e", "f"]), rollout(3, ["g", "g"])]
    scores = [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    values: list[float] = []
    pairs, drops = make_pairs(rollouts, scores, "max_min", 0.0, 0, 0, tie_values=values)
    assert [p.uid for p in pairs] == [2] and drops == {"tie": 2, "identical": 1}
    assert tie_kinds(values, [x for row in scores for x in row]) == {"tie_high": 1, "tie_low": 1}
    assert tie_kinds([3.0, 3.0], [3.0, 3.0]) == {"tie_high": 0, "tie_low": 2}  # one reward for everything


def test_a_tied_prompt_is_held_sampled_again_and_paired_over_all_its_samples():
    r = Resampler(extra=1)
    first = [rollout(0, ["a", "b"]), rollout(1, ["c", "d"]), rollout(2, ["e", "f"])]
    merged, scores = r.merge(first, [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    pairs, drops = make_pairs(merged, scores, "max_min", 0.0, 0, 0, hold=r.hold)
    assert [p.uid for p in pairs] == [1] and drops == {"tie": 0, "identical": 0}  # 0 and 2 are held, not dropped
    chunk = r.next_chunk(round_index=0, chunk_id=5, seed=3)
    assert chunk.chunk_id == 5 and [p.uid for p in chunk.prompts] == [0, 2] and r.next_chunk(0, 6, 3) is None

    class Out:
        rescued = 0

    out = Out()
    r.settle(pairs, out, merged)
    assert out.rescued == 0 and set(r.held) == {0, 2}
    # the second draw: prompt 0 now has a right answer, prompt 2 ties again and has no draws left
    merged, scores = r.merge([rollout(0, ["x", "y"]), rollout(2, ["z", "w"])], [[1.0, 0.0], [0.0, 0.0]])
    assert [len(ro.responses) for ro in merged] == [4, 4] and scores[0] == [0.0, 0.0, 1.0, 0.0]
    pairs, drops = make_pairs(merged, scores, "max_min", 0.0, 0, 0, hold=r.hold)
    assert [(p.uid, p.chosen) for p in pairs] == [(0, "x")] and drops["tie"] == 1
    r.settle(pairs, out, merged)
    assert out.rescued == 1 and r.held == {} and r.next_chunk(0, 6, 3) is None


def test_the_round_line_says_why_prompts_gave_no_pair_and_what_helps():
    m = {"round": 0, "prompts/count": 32, "pairs/count": 6, "drop/tie": 25, "drop/tie_high": 4, "drop/tie_low": 21,
         "drop/identical": 1, "drop/bad": 0, "gen/resampled_prompts": 0, "score/function_errors": 0}
    line = pairs_line(m, 4)
    assert "6 pairs from 32 prompts" in line and "4 whose samples all tied high" in line and "21 all tied low" in line
    assert "generator.resample_ties" in line and "generator.n" in line
    assert "what helps" not in pairs_line(m | {"pairs/count": 20, "drop/tie_low": 7}, 4)


# ---------------------------------------------------------------------------------------------------------
# the user's own functions


REWARD_PY = '''
def contains_word(messages, response, word):
    """1 when the response contains the row's word."""
    return float(word.lower() in response.lower())


def not_a_number(messages, response):
    return float("nan")


def picky(messages, response, word):
    if "boom" in messages[-1]["content"]:
        raise KeyError("no such entry")
    return 1.0
'''


@pytest.fixture
def user_task(tmp_path):
    """A user's task folder: a config naming a reward function in a .py file beside it, and its data."""
    folder = tmp_path / "mytask"
    folder.mkdir()
    module = f"user_reward_{os.getpid()}_{id(folder) % 10_000}"
    (folder / f"{module}.py").write_text(REWARD_PY)
    rows = [{"prompt": f"Say the word {w}.", "word": w} for w in ("apple", "river", "stone", "cloud") * 30]
    with open(folder / "words.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (folder / "task.yaml").write_text(textwrap.dedent(f"""\
        base: {REPO / 'configs' / 'tiny.yaml'}
        run: {{name: mytask, rounds: 2}}
        data: {{path: {folder / 'words.jsonl'}, prompts_per_round: 16}}
        generator: {{n: 4, max_new_tokens: 16}}
        scorer: {{type: function, function: "{module}:contains_word"}}
        eval: {{prompts: 8, gold_reward: "{module}:contains_word"}}
        reward_training: {{data_path: builtin:policy-samples, prompts: {folder / 'no-such-file.jsonl'}}}
        """))
    yield folder, module
    sys.modules.pop(module, None)
    sys.path[:] = [p for p in sys.path if p != str(folder)]


def test_a_reward_file_next_to_the_config_is_found_from_any_directory(user_task, monkeypatch):
    folder, module = user_task
    monkeypatch.chdir(REPO)  # not the task's folder
    monkeypatch.delenv(CODE_PATH_ENV, raising=False)
    cfg = load_config(str(folder / "task.yaml"))  # also: the unused reward_training prompts file is not checked
    assert os.environ[CODE_PATH_ENV].split(os.pathsep) == [str(folder), str(REPO)]
    sys.modules.pop(module, None)
    fn = RewardFn(cfg.scorer.function)
    assert fn([], "An Apple a day", {"word": "apple"}) == 1.0
    # inside a Ray job every node runs from its own copy of the working_dir: the paths are relative to it
    monkeypatch.chdir(folder.parent)
    assert code_path_for("mytask/task.yaml", in_job=True).split(os.pathsep) == ["mytask", "."]


def test_validation_imports_every_function_and_checks_its_columns(user_task, monkeypatch):
    folder, module = user_task
    monkeypatch.chdir(REPO)
    config = str(folder / "task.yaml")
    with pytest.raises(ConfigError, match=r"`scorer.function`: .*cannot import module 'nope'.*next to the config"):
        load_config(config, ["scorer.function=nope:fn"])
    with pytest.raises(ConfigError, match=rf"`eval.gold_reward`: .*{module} has no function 'missing' \(it defines: contains_word, not_a_number, picky\)"):
        load_config(config, [f"eval.gold_reward={module}:missing"])
    with pytest.raises(ConfigError, match=r"`scorer.function`: .*needs the column\(s\) \['word'\], which data.path .* lacks \(its columns besides the prompt: \['prompt2'\]\)"):
        rows = folder / "other.jsonl"
        rows.write_text(json.dumps({"prompt2": "x", "prompt": "Say it."}) + "\n")
        load_config(config, [f"data.path={rows}"])
    with pytest.raises(ConfigError, match=r"`scorer.function`: actors.rewards:first_number must take"):
        load_config(config, ["scorer.function=actors.rewards:first_number"])
    # the reward model is used: now its prompt file is checked, and its rule against that file's columns
    with pytest.raises(ConfigError, match=r"`reward_training.prompts`: path does not exist"):
        load_config(config, ["scorer.type=reward_model", "scorer.model_path=reward_training"])
    # validate from the command line: one line, within seconds, exit 2
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", config, "scorer.function=nope:fn"],
                          capture_output=True, text=True, env=env, cwd=str(REPO), timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("odpo: config error at `scorer.function`")


def test_a_function_that_raises_names_itself_and_the_prompt_or_counts_the_rows_as_failures(user_task, monkeypatch):
    folder, module = user_task
    monkeypatch.setenv(CODE_PATH_ENV, str(folder))
    stop = RewardFn(f"{module}:picky")
    with pytest.raises(UserFunctionError, match=rf"scorer.function={module}:picky failed on prompt 'boom here' "
                                                r"\(response 'r'\): KeyError: 'no such entry'; .*function_errors=score"):
        stop([{"role": "user", "content": "boom here"}], "r", {"word": "w"})
    counted = RewardFn(f"{module}:picky", errors="score", failure_score=-1.0)
    got = [counted([{"role": "user", "content": c}], "r", {"word": "w"}) for c in ("fine", "boom", "boom")]
    assert got == [1.0, -1.0, -1.0] and counted.take_failures() == 2 and counted.take_failures() == 0
    with pytest.raises(UserFunctionError, match=r"failed on prompt 'q' \(response 'r'\): ValueError: returned nan"):
        RewardFn(f"{module}:not_a_number")([{"role": "user", "content": "q"}], "r", {})
    with pytest.raises(UserFunctionError, match=r"x.y=.*cannot import module 'no_such_module_here'"):
        import_function("no_such_module_here:f", "x.y")


@pytest.mark.slow
def test_a_users_task_runs_from_another_directory_and_a_failing_function_stops_in_one_line(user_task, tmp_path):
    """The whole run (Ray, the generators, the scorers and the driver's evaluation) imports the reward file that
    sits next to the config, run from another directory; a function that raises on some prompts stops the run
    in one line naming it, or with function_errors=score is counted in the round line (with tied prompts
    sampled again and the evaluation's intervals)."""
    folder, module = user_task
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != CODE_PATH_ENV} | {"PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "orchestrator.cli", "run", str(folder / "task.yaml"), f"run.output_dir={tmp_path / 'runs'}",
            "metrics.wandb=false", "generator.backend=hf", "run.rounds=1", "generator.resample_ties=1"]
    # a function that raises where the prompt says "boom" (one of the words): one line, exit 2
    rows = [{"prompt": f"Say {w}.", "word": w} for w in ("apple", "boom", "stone", "cloud") * 30]
    with open(folder / "words.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    picky = [f"scorer.function={module}:picky", f"eval.gold_reward={module}:picky", "run.name=picky"]
    done = subprocess.run(base + picky, capture_output=True, text=True, env=env, cwd=str(elsewhere), timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"odpo: scorer.function={module}:picky failed on prompt 'Say boom.'") or \
        last.startswith(f"odpo: eval.gold_reward={module}:picky failed on prompt 'Say boom.'"), last
    done = subprocess.run(base + picky + ["scorer.function_errors=score", "run.name=picky2"], capture_output=True,
                          text=True, env=env, cwd=str(elsewhere), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(open(tmp_path / "runs" / "picky2" / "metrics.jsonl").readline())
    assert line["score/function_errors"] > 0 and line["eval/gold_errors"] > 0
    assert f"the scorer's function failed {line['score/function_errors']} times" in done.stderr
    assert line["prompts/count"] == 16 and line["pairs/count"] + line["drop/tie"] + line["drop/identical"] == 16
    assert line["drop/tie"] == line["drop/tie_high"] + line["drop/tie_low"]
    assert line["gen/resampled_prompts"] >= line["drop/tie"]  # every tie was sampled once more before it dropped
    assert line["eval/samples"] == 32 and "eval/gold_change_ci95" in line and "eval/nll" in line and "eval/rare_tokens_initial" in line
    assert "pairs from 16 prompts; no pair:" in done.stderr and "(32 samples of 8 prompts" in done.stderr


def test_tie_and_error_settings_are_checked(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"`generator.resample_ties`: must be >= 0"):
        load_config("configs/tiny.yaml", ["generator.resample_ties=-1"])
    with pytest.raises(ConfigError, match=r"`generator.resample_ties`: a pairwise judge"):
        load_config("configs/tiny.yaml", ["generator.resample_ties=1", "scorer.type=pairwise", "scorer.model_path=null",
                                          "scorer.function=actors.rewards:prefer_lowercase"])
    with pytest.raises(ConfigError, match=r"`scorer.function_errors`: stop .* or score"):
        load_config("configs/tiny.yaml", ["scorer.function_errors=skip"])


def test_drift_is_reported_only_outside_the_fluency_bounds():
    from orchestrator.evaluation import drift

    sound = {"eval/rare_tokens": 0.022, "eval/rare_tokens_initial": 0.021, "eval/nll": 1.68, "eval/nll_initial": 1.81}
    assert drift(sound) is None and drift({"eval/kl": 1.0}) is None
    made_up = sound | {"eval/rare_tokens": 0.05}
    assert "5.0% of its tokens" in drift(made_up) and "NLL" not in drift(made_up)
    collapsed = sound | {"eval/nll": 2.9}  # a format collapse: bare numbers the initial policy finds unlikely
    assert "2.90 against 1.81" in drift(collapsed)
    assert drift(sound | {"eval/rare_tokens": 0.009, "eval/rare_tokens_initial": 0.001}) is None  # under 1% of tokens
