"""A user's own functions (`module:function` in a config: reward functions, verifiers, judges), found and
called the same way in every process that calls them.

Where modules are found: the folders in ODPO_CODE_PATH (the config file's folder, then the directory the
run was started from; set by the driver, handed to every actor through Ray's runtime_env, relative to each
process's working directory inside a Ray job, whose working_dir is unpacked anew on every node), then the
usual sys.path. So a reward.py next to the config imports in the driver's evaluation, the scorers, the
reward-model data and on every node of a submitted job alike.

How errors are handled: a function that raises on a row stops the run with one line that names the function,
the prompt and the error (`UserFunctionError`), or, with `scorer.function_errors=score`, that row gets
`scorer.failure_score` and is counted (`failures`), so the round's line shows how many.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable

CODE_PATH_ENV = "ODPO_CODE_PATH"


class UserFunctionError(ValueError):
    """A user's function could not be imported or failed on a row; the message says which and what to do. The
    CLI prints it in one line (also when it reaches the driver from an actor, inside Ray's RayTaskError)."""


def code_path_for(config_path: str, in_job: bool) -> str:
    """ODPO_CODE_PATH for a config file: its folder, then the current directory. Inside a Ray job the paths
    are relative (every node unpacks the job's working_dir somewhere else and runs actors from there)."""
    folder = os.path.dirname(config_path) or "."
    if in_job:
        folders = [os.path.relpath(os.path.abspath(folder)), "."]
    else:
        folders = [os.path.abspath(folder), os.getcwd()]
    return os.pathsep.join(dict.fromkeys(folders))


def add_code_path() -> None:
    """Put ODPO_CODE_PATH's folders first on sys.path (relative ones against this process's directory)."""
    for entry in reversed(os.environ.get(CODE_PATH_ENV, "").split(os.pathsep)):
        if entry:
            folder = os.path.abspath(entry)
            if folder not in sys.path:
                sys.path.insert(0, folder)


def import_function(spec: str, key: str = "scorer.function") -> Callable:
    """The callable `module:function`; UserFunctionError (naming `key` and where modules were looked for)
    when the module or the function is not there."""
    add_code_path()
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        where = [p for p in os.environ.get(CODE_PATH_ENV, "").split(os.pathsep) if p]
        raise UserFunctionError(
            f"{key}={spec!r}: cannot import module {module_name!r} ({e}); put {module_name.replace('.', '/')}.py "
            f"next to the config or in the directory you run from{f' (looked in {where} first)' if where else ''}, "
            f"or install it") from None
    except Exception as e:  # the module itself fails as it runs
        raise UserFunctionError(f"{key}={spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise UserFunctionError(f"{key}={spec!r}: {module_name} has no function {attr!r}"
                                + (f" (it defines: {', '.join(found)})" if found else ""))
    return fn


def prompt_text(messages: list[dict]) -> str:
    return messages[-1]["content"][:100] if messages else ""


class RewardFn:
    """A `module:function` reward, called as fn(messages, response, **columns) with the prompt row's dataset
    columns that the function names as parameters (every column if it takes **kwargs), the way TRL hands dataset
    columns to its reward functions: a verifier reads the row's `answer` instead of parsing the prompt.

    `errors`: `stop` (UserFunctionError naming the function, the prompt and the error) or `score` (the row gets
    `failure_score`; `failures` counts them)."""

    def __init__(self, spec: str, errors: str = "stop", failure_score: float = 0.0, key: str = "scorer.function"):
        self.spec, self.key, self.errors, self.failure_score = spec, key, errors, failure_score
        self.fn = import_function(spec, key)
        self.names, self.required, self.takes_all = parameters(self.fn, 2)
        self.failures = 0

    def __call__(self, messages: list[dict], response: str, columns: dict | None = None) -> float:
        columns = columns or {}
        missing = [k for k in self.required if k not in columns]
        if missing:
            raise UserFunctionError(
                f"{self.key}={self.spec} needs the dataset column(s) {missing}, which the prompt row does not have "
                f"(its columns besides the prompt: {sorted(columns)}); add them to the data or give the "
                f"parameter(s) a default")
        kwargs = dict(columns) if self.takes_all else {k: columns[k] for k in self.names if k in columns}
        try:
            value = float(self.fn(messages, response, **kwargs))
            if not math.isfinite(value):
                raise ValueError(f"returned {value} (not a finite number)")
        except Exception as e:
            if self.errors == "score":
                self.failures += 1
                return self.failure_score
            raise function_failed(f"{self.key}={self.spec}", messages, f"response {response[:60]!r}", e,
                                  "score such rows as failures (scorer.failure_score)") from None
        return value

    def take_failures(self) -> int:
        """Failures since the last call (a scorer reports them per chunk)."""
        n, self.failures = self.failures, 0
        return n


def function_failed(name: str, messages: list[dict], shown: str, error: Exception, instead: str) -> UserFunctionError:
    """The one line a user function that raised on a row stops the run with: the function, the prompt, what
    it was shown, the error, and what scorer.function_errors=score does instead."""
    return UserFunctionError(
        f"{name} failed on prompt {prompt_text(messages)!r} ({shown}): {type(error).__name__}: {error}; fix the "
        f"function, or set scorer.function_errors=score to {instead} and count them")


def parameters(fn: Callable, fixed: int) -> tuple[list[str], list[str], bool]:
    """(the parameter names after the first `fixed`, those without a default, whether it takes **kwargs)."""
    params = list(inspect.signature(fn).parameters.values())
    named = [p for p in params[fixed:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return ([p.name for p in named], [p.name for p in named if p.default is p.empty],
            any(p.kind == p.VAR_KEYWORD for p in params))


def positional_capacity(fn: Callable) -> int:
    """How many positional arguments `fn` accepts (a large number with *args)."""
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 1 << 30
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
