"""A user's reward function beside its config (tests/user_task/task.yaml), for the submitted job of
tests/test_cluster.py: its module is importable only through ODPO_CODE_PATH (the config's folder), which the
job's actors resolve against their own node's copy of the working_dir."""


def lowercase_share(messages, response):
    """The share of ASCII lowercase letters and spaces (configs/tiny.yaml's rule, written by a user)."""
    if not response:
        return 0.0
    return sum(1 for c in response if c == " " or "a" <= c <= "z") / len(response)
