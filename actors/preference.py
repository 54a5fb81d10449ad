"""RLHFlow's pairwise preference model format: a causal LM reads both responses in one user turn and answers
"A" or "B" (RLHFlow/pair-preference-model-LLaMA3-8B, as its model card and RLHFlow's annotation pipeline use it).

The input, for a conversation `messages` (the prompt's turns) and two responses:
1. `context`: the conversation in RLHFlow's plain template (`PLAIN_TEMPLATE`), turns by position: user,
   assistant, user, ... each as a "<turn> user" / "<turn> assistant" block;
2. one user turn: `[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \\n`;
3. that turn in the model's own chat template, with the generation prompt (the model answers as the
   assistant; `generation_prompt=False` renders it without, as RLHFlow's annotation script does), the BOS
   token's text removed and the rest tokenized without special tokens (the published usage: no BOS).

P(A better) = softmax over the next-token logits of the tokens "A" and "B" at the last position (temperature
1). Used both ways round (the scorer averages P(A) over the two orders) and in the knockout tournament.
Training (`odpo train-rm`, reward_training.type=pairwise): the next-token loss on the right letter, each
pair shown in a seeded random order.
"""

from __future__ import annotations

from actors.types import Messages

PLAIN_TEMPLATE = ("\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n {{ message['content'] }}"
                  "{% else %}\n\n<turn> assistant\n {{ message['content'] }}{% endif %}{% endfor %}\n\n\n")
"""RLHFlow's template for the conversation inside the prompt (turns alternate by position, not by role)."""

PROMPT_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \n"
"""RLHFlow's one user turn holding the conversation and both responses."""


def letter_id(tokenizer, letter: str) -> int:
    """The token id of "A" or "B"; an error unless the tokenizer makes it one token."""
    ids = tokenizer.encode(letter, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"pairwise preference model: its tokenizer splits {letter!r} into {len(ids)} tokens {ids}; "
                         f"RLHFlow's format reads the next-token probability of {letter!r} as one token")
    return ids[0]


class PreferenceFormat:
    """Renders (messages, response A, response B) as RLHFlow's pairwise model reads them, and knows the ids of
    the answer tokens."""

    def __init__(self, tokenizer, generation_prompt: bool = True):
        self.tokenizer = tokenizer
        self.generation_prompt = generation_prompt
        self.id_a, self.id_b = letter_id(tokenizer, "A"), letter_id(tokenizer, "B")
        if self.id_a == self.id_b:
            raise ValueError("pairwise preference model: its tokenizer gives 'A' and 'B' the same token id")

    def context(self, messages: Messages) -> str:
        roles = [m["role"] for m in messages]
        expected = ["user" if k % 2 == 0 else "assistant" for k in range(len(roles))]
        if roles != expected:
            raise ValueError(f"pairwise preference model: RLHFlow's template renders turns by position (user, "
                             f"assistant, user, ...); this conversation's roles are {roles} (a system turn cannot "
                             f"be shown to it: fold it into the first user turn)")
        return self.tokenizer.apply_chat_template(messages, chat_template=PLAIN_TEMPLATE, tokenize=False)

    def text(self, messages: Messages, response_a: str, response_b: str) -> str:
        turn = PROMPT_TEMPLATE.format(context=self.context(messages), response_A=response_a, response_B=response_b)
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": turn}], tokenize=False,
                                                  add_generation_prompt=self.generation_prompt)
        bos = self.tokenizer.bos_token
        return text.replace(bos, "") if bos else text

    def ids(self, messages: Messages, response_a: str, response_b: str, max_length: int) -> list[int]:
        """The input's token ids, its last `max_length` (the end holds the responses and the answer position)."""
        ids = self.tokenizer(self.text(messages, response_a, response_b), add_special_tokens=False)["input_ids"]
        return ids[-max_length:]
