"""One way to turn (prompt, response) into model input, used by training, evaluation and export alike.

The prompt (canonical chat JSON, see `rmpipe.schema`) plus the response as an
assistant turn go through the backbone's own chat template. Any drift between
how training and scoring render text silently changes rewards, so nothing else
in rmpipe builds model input by hand.
"""

from __future__ import annotations

from rmpipe.schema import prompt_messages


def conversation(prompt: str, response: str) -> list[dict[str, str]]:
    return prompt_messages(prompt) + [{"role": "assistant", "content": response}]


def render(tokenizer, prompt: str, response: str) -> str:
    """The exact text the reward model scores for this prompt and response."""
    return tokenizer.apply_chat_template(conversation(prompt, response), tokenize=False)


def encode(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids of `render(...)`; the template already holds every special token, so none are added.

    Rows longer than `model.max_length` are left-truncated and counted by the caller, so transformers'
    "will result in indexing errors" warning about them would be wrong: verbose=False."""
    return tokenizer(render(tokenizer, prompt, response), add_special_tokens=False, verbose=False)["input_ids"]
