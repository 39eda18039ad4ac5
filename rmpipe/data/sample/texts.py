"""Sample texts: prompts, a good response and one with a single clear flaw, composed from the phrase banks
of `rmpipe.data.sample.vocab` (the vote side, the annotator crowd, is `rmpipe.data.sample.batches`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd

from rmpipe.data.sample import vocab


@dataclass(frozen=True)
class Prompt:
    text: str  # the user's request
    subject: str  # what a helpful answer talks about
    fact: vocab.Fact | None
    delivered: Any  # str, or a list of chat messages


def _pick(rng: random.Random, options):
    """rng.choice, about 3x faster (it matters for 250k-pair benchmark sets)."""
    return options[int(rng.random() * len(options))]


def _slots(rng: random.Random) -> dict[str, Any]:
    v = vocab
    return {
        "name": _pick(rng, v.NAMES), "relation": _pick(rng, v.RELATIONS), "activity": _pick(rng, v.ACTIVITIES),
        "object": _pick(rng, v.OBJECTS), "topic": _pick(rng, v.TOPICS), "audience": _pick(rng, v.AUDIENCES),
        "event": _pick(rng, v.EVENTS), "pet": _pick(rng, v.PETS), "thing": _pick(rng, v.THINGS),
        "items": _pick(rng, v.ITEMS), "subject": _pick(rng, v.SUBJECTS), "quote": _pick(rng, v.QUOTES),
        "n": rng.randint(2, 9), "age": rng.randint(12, 80), "day": _pick(rng, v.DAYS),
    }


def _fill(rng: random.Random, bank: tuple[str, ...], target_chars: int, slots: dict[str, Any]) -> list[str]:
    """Sentences from `bank` (formatted with `slots`), no repeats until the bank is used up, until
    about `target_chars` long."""
    options = [sentence.format(**slots) for sentence in bank] if slots else list(bank)
    rng.shuffle(options)
    out: list[str] = []
    size = 0
    while size < target_chars:
        sentence = options[len(out) % len(options)]
        out.append(sentence)
        size += len(sentence) + 1
    return out


def _make_prompt(rng: random.Random, long_texts: bool) -> Prompt:
    slots = _slots(rng)
    if rng.random() < 0.4:
        fact = _pick(rng, vocab.FACTS)
        text = _pick(rng, vocab.FACT_FRAMES).format(q=fact.question, **slots)
        subject = "this question"
    else:
        fact = None
        frame, key = _pick(rng, vocab.TASK_FRAMES)
        text = frame.format(**slots)
        subject = str(slots[key])
    if rng.random() < 0.6:
        text = f"{_pick(rng, vocab.PROMPT_OPENERS).format(**slots)} {text}"
    if rng.random() < 0.4:
        text = f"{text} {_pick(rng, vocab.PROMPT_CLOSERS).format(**slots)}"
    if long_texts:  # a pasted background of 300-3000 chars (log-uniform) before the question
        target = int(300 * 10 ** rng.random())
        text = " ".join(_fill(rng, vocab.CONTEXT_SENTENCES, target - len(text), slots)) + "\n\n" + text
    delivered: Any = text
    if rng.random() < 0.2:  # chat-message delivery, sometimes multi-turn
        delivered = [{"role": "system", "content": _pick(rng, vocab.SYSTEM_PROMPTS)}]
        if rng.random() < 0.3:
            user, assistant = _pick(rng, vocab.EARLIER_TURNS)
            delivered += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        delivered.append({"role": "user", "content": text})
    return Prompt(text, subject, fact, delivered)


def _core_answer(rng: random.Random, prompt: Prompt, n_sentences: int, long_texts: bool) -> tuple[str, str]:
    """The substance of a good answer and the phrasing its fact is stated in ("" when no fact was
    asked): the fact in one of its phrasings, or helpful sentences about the subject."""
    slots = {"s": prompt.subject}
    phrasing = _pick(rng, prompt.fact.phrasings) if prompt.fact else ""
    parts = [phrasing.format(prompt.fact.right)] if prompt.fact else []
    if prompt.fact or long_texts:
        bank = vocab.FACT_EXTRAS if prompt.fact else vocab.HELPFUL_SENTENCES
        if long_texts:
            parts += _fill(rng, bank, rng.randint(200, 650), slots)
        else:
            parts += [sentence.format(**slots) for sentence in rng.sample(bank, n_sentences)]
        return " ".join(parts), phrasing
    # Task answers in many shapes: advice about the subject, concrete steps that never name it,
    # and sometimes the reason why (short direct answers and longer explanatory ones).
    n_about = sum(rng.random() < 0.4 for _ in range(n_sentences))
    parts += [sentence.format(**slots) for sentence in rng.sample(vocab.HELPFUL_SENTENCES, n_about)]
    parts += rng.sample(vocab.ADVICE_STEPS, n_sentences - n_about)
    rng.shuffle(parts)
    if n_sentences > 1 and rng.random() < 0.3:
        parts[-1] = _pick(rng, vocab.EXPLANATIONS)
    return " ".join(parts), phrasing


def _rude(rng: random.Random, core: str, long_texts: bool) -> str:
    """A dismissive opener, then the answer (often cut to its first sentence, sometimes withheld), then
    maybe a jab: tone is the flaw, so the content ranges from complete to none (long texts: complete)."""
    shape = 1.0 if long_texts else rng.random()
    if shape < 0.15:
        content = ""  # rude and no help at all
    elif shape < 0.55:
        content = core.split(". ")[0].rstrip(".") + "."  # a curt first sentence only
    else:
        content = core
    closer = [_pick(rng, vocab.RUDE_CLOSERS)] if not content or rng.random() < 0.35 else []
    return " ".join([_pick(rng, vocab.RUDE_OPENERS)] + ([content] if content else []) + closer)


def _make_pair(rng: random.Random, prompt: Prompt, long_texts: bool) -> tuple[str, str, str]:
    """(good, flawed, flaw kind) for one prompt."""
    kinds = vocab.FLAW_KINDS if prompt.fact else tuple(k for k in vocab.FLAW_KINDS if k != "wrong_fact")
    weights = [4.0 if k == "wrong_fact" else 1.0 for k in kinds]  # fact prompts mostly test the fact
    flaw = rng.choices(kinds, weights)[0]
    # Good answers vary from one short sentence to several; waffle is always beaten by a short answer.
    fewest = 0 if prompt.fact else 1  # a fact answer is complete with the fact alone
    n_sentences = rng.randint(fewest, 1) if flaw == "waffle" else rng.randint(fewest, 4 - 2 * bool(prompt.fact))
    core, phrasing = _core_answer(rng, prompt, n_sentences, long_texts)
    if flaw == "rude":
        # Polite frames are optional and rude ones short, so tone (not length) tells them apart.
        polite = [_pick(rng, vocab.POLITE_OPENERS)] if rng.random() < 0.7 else []
        polite += [core] + ([_pick(rng, vocab.POLITE_CLOSERS)] if rng.random() < 0.75 else [])
        return " ".join(polite), _rude(rng, core, long_texts), flaw
    good = core if rng.random() < 0.6 else f"{_pick(rng, vocab.POLITE_OPENERS)} {core}"
    if flaw == "wrong_fact":
        assert prompt.fact is not None
        right, wrong = phrasing.format(prompt.fact.right), phrasing.format(prompt.fact.wrong)
        return good, good.replace(right, wrong, 1), flaw
    if flaw == "refusal":
        extra = rng.randint(150, 500) if long_texts else rng.choice((0, 0, 40, 80))
        reasons = _fill(rng, vocab.REFUSAL_REASONS, extra, {"s": prompt.subject}) if extra else []
        return good, " ".join([_pick(rng, vocab.REFUSALS)] + reasons), flaw
    if flaw == "waffle":
        target = max(len(good) + 120, rng.randint(220, 340) if not long_texts else rng.randint(500, 900))
        return good, " ".join(_fill(rng, vocab.WAFFLE_SENTENCES, target, {"s": prompt.subject})), flaw
    # off_topic: a fluent answer about something else entirely
    target = rng.randint(200, 650) if long_texts else rng.randint(20, 200)
    return good, " ".join(_fill(rng, vocab.OFF_TOPIC_SENTENCES, target, {})), flaw


def prompt_key(delivered: Any) -> str:
    return delivered if isinstance(delivered, str) else orjson.dumps(delivered).decode()


def generate_pairs(seed: int, n: int, long_texts: bool) -> pd.DataFrame:
    """`n` distinct comparisons: prompt (as delivered), good, bad, flaw. ~20% of pairs reuse a prompt."""
    rng = random.Random(seed)
    prompts: list[Prompt] = []
    seen: set[tuple[str, str, str]] = set()
    rows: list[tuple[Any, str, str, str]] = []
    while len(rows) < n:
        if prompts and rng.random() < 0.2:
            prompt = prompts[rng.randrange(len(prompts))]
        else:
            prompt = _make_prompt(rng, long_texts)
            prompts.append(prompt)
        good, bad, flaw = _make_pair(rng, prompt, long_texts)
        key = (prompt_key(prompt.delivered), good, bad)
        if key in seen:  # the same comparison twice would merge into one pair downstream
            continue
        seen.add(key)
        rows.append((prompt.delivered, good, bad, flaw))
    frame = pd.DataFrame({name: objects(column) for name, column in zip(("prompt", "good", "bad", "flaw"), zip(*rows))})
    frame["strength"] = objects(frame["flaw"].map(vocab.FLAW_STRENGTH))
    return frame


def objects(values) -> pd.Series:
    """An object column: keeps references to shared strings (a `str` column would copy every row)."""
    return pd.Series(list(values) if not isinstance(values, (np.ndarray, pd.Series)) else values, dtype=object)


def ranked_groups(n_prompts: int, seed: int) -> list[tuple[Any, list[str]]]:
    """`n_prompts` (prompt as delivered, 4 distinct responses best first): two (good, flawed) draws per prompt,
    ranked good, good, flawed, flawed -- the K = 4 shape of ranking datasets (6 comparisons per prompt)."""
    rng, groups = random.Random(seed), []
    while len(groups) < n_prompts:
        prompt = _make_prompt(rng, long_texts=False)
        (good_1, bad_1, _), (good_2, bad_2, _) = _make_pair(rng, prompt, False), _make_pair(rng, prompt, False)
        responses = [good_1, good_2, bad_1, bad_2]
        if len(set(responses)) == 4:  # two draws can give one text: keep 4 distinct responses
            groups.append((prompt.delivered, responses))
    return groups
