"""The plurals task's verifier: a user's own reward function, next to its config (odpo finds it there).

odpo calls it as fn(messages, response, **columns) and hands it the prompt row's columns it names (here
`plural`), in the driver's evaluation, the scorers and on every node of a cluster job alike.
"""

import re


def plural_named(messages, response, plural):
    """1.0 when the right plural appears as a whole word among the response's first 12 words, else 0.0.

    The window keeps a list of guesses from counting: "The plural of "mouse" is "mice"." counts, a response that
    names it only after a paragraph does not."""
    words = re.findall(r"[a-z]+", response.lower())[:12]
    return 1.0 if plural.lower() in words else 0.0
