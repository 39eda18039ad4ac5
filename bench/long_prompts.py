"""A generated long-prompt preference set for the training benchmark (bench/train_throughput.py).

    make_long_pairs(n_pairs, seed, tokenizer) -> pandas.DataFrame   (the columns of data/split/*.parquet)
    make_long_groups(n_groups, seed, tokenizer) -> the same columns: K = 4 responses per prompt, all 6 comparisons

Each prompt is a multi-turn chat (an optional system turn, then user/assistant exchanges on assorted
topics, ending with a user turn) of 100-400 tokens, measured as the backbone renders it through its
chat template; each response is 20-120 tokens. The last user turn asks about one topic and adds a
format instruction (bullets, numbered list, lowercase, a fixed opening) or none. The chosen response
answers that topic and follows the instruction; the rejected one either answers an *earlier* turn's
topic (so the model must read the last turn, not just the conversation) or answers the right topic
but ignores the instruction. Chosen and rejected lengths are drawn independently from the same
range, so length says nothing about which one is preferred.

A pure function of (n_pairs, seed, tokenizer): every draw comes from `random.Random(seed)`, and a
candidate outside a length band is redrawn, never cut mid-word.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

import pandas as pd

from rmpipe.core.schema import PAIR_COLUMNS, canonical_messages, messages_hash, pair_id, to_messages

PROMPT_TOKENS = (100, 400)  # the rendered prompt (chat template included)
RESPONSE_TOKENS = (20, 120)  # the response text alone
MAX_TRIES = 200  # redraws of one prompt / response before giving up (never reached in practice)

TOPICS: dict[str, list[str]] = {
    "astronomy": [
        "Jupiter is the largest planet in the solar system and has dozens of known moons.",
        "A light year is the distance light travels in one year, about 9.46 trillion kilometres.",
        "The Sun is a main sequence star that fuses hydrogen into helium in its core.",
        "Saturn's rings are made mostly of ice particles with a small amount of rock.",
        "A solar eclipse happens when the Moon passes between the Earth and the Sun.",
        "Mars looks red because iron minerals in its dust have oxidised.",
        "Neutron stars are so dense that a teaspoon of their matter would weigh billions of tonnes.",
        "The Andromeda galaxy is the nearest large spiral galaxy to the Milky Way.",
    ],
    "bread baking": [
        "Yeast ferments sugars in the dough and releases carbon dioxide that makes it rise.",
        "Kneading develops gluten, the protein network that traps gas and gives bread its chew.",
        "A sourdough starter is a culture of wild yeast and lactic acid bacteria.",
        "Steam in the first minutes of baking keeps the crust soft so the loaf can expand.",
        "Bread flour has more protein than cake flour, which gives a stronger dough.",
        "A longer, cooler proof develops more flavour than a short, warm one.",
        "The crust browns through the Maillard reaction between sugars and amino acids.",
        "Letting a loaf cool before slicing lets the crumb finish setting.",
    ],
    "vegetable gardening": [
        "Tomatoes need at least six hours of direct sunlight a day to fruit well.",
        "Rotating crops each year reduces soil-borne diseases and pests.",
        "Mulch keeps moisture in the soil and suppresses weeds around the plants.",
        "Beans and peas fix nitrogen from the air with the help of root bacteria.",
        "Watering deeply but less often encourages roots to grow downwards.",
        "Compost adds organic matter that improves both drainage and water retention.",
        "Lettuce bolts and turns bitter when the weather gets hot.",
        "Companion planting marigolds near vegetables can deter some insects.",
    ],
    "python programming": [
        "A list comprehension builds a new list from an iterable in a single expression.",
        "Dictionaries map hashable keys to values and keep insertion order.",
        "The with statement closes files and releases locks even when an error occurs.",
        "Virtual environments keep each project's dependencies separate from the others.",
        "Generators produce values lazily with yield, so they use little memory.",
        "Type hints document the expected types and let tools like mypy check them.",
        "The standard library module pathlib handles file paths as objects.",
        "Exceptions should be caught as narrowly as possible so real bugs are not hidden.",
    ],
    "medieval history": [
        "The Magna Carta was sealed by King John of England in 1215.",
        "Castles were built with thick stone walls and towers to withstand sieges.",
        "The Black Death killed a large share of Europe's population in the fourteenth century.",
        "Monasteries copied manuscripts by hand and preserved many classical texts.",
        "Feudal lords granted land to vassals in exchange for military service.",
        "The printing press of Johannes Gutenberg appeared around 1440.",
        "Guilds regulated the quality of goods and the training of craftsmen in towns.",
        "The Hundred Years' War was fought between England and France.",
    ],
    "marine biology": [
        "Coral reefs are built by colonies of tiny animals called polyps.",
        "Octopuses have three hearts and blue, copper-based blood.",
        "Blue whales are the largest animals known to have ever lived.",
        "Phytoplankton produce a large share of the oxygen in the atmosphere.",
        "Sea turtles return to the beaches where they hatched to lay their eggs.",
        "Many deep-sea fish make their own light through bioluminescence.",
        "Kelp forests grow in cold, nutrient-rich coastal waters.",
        "Sharks have skeletons made of cartilage instead of bone.",
    ],
    "personal finance": [
        "An emergency fund usually covers three to six months of essential expenses.",
        "Compound interest means earnings themselves start to earn interest over time.",
        "Index funds spread money across many companies at a low cost.",
        "Paying off high-interest debt first saves the most money overall.",
        "A budget tracks income and spending so that savings can be planned.",
        "Diversification lowers the risk of losing a lot on a single investment.",
        "Automatic transfers on payday make saving a habit rather than a decision.",
        "Inflation reduces what the same amount of money can buy over the years.",
    ],
    "cycling": [
        "Correct tyre pressure makes a bike roll faster and reduces punctures.",
        "A chain should be cleaned and lubricated regularly to shift smoothly.",
        "Saddle height is right when the knee is slightly bent at the bottom of the stroke.",
        "Lower gears make climbing easier by trading speed for less effort per pedal stroke.",
        "A helmet should sit level on the head and fit snugly.",
        "Disc brakes work better than rim brakes in wet weather.",
        "Riding in a group lets cyclists save energy by drafting behind each other.",
        "Lights and reflective clothing make a rider visible at night.",
    ],
    "photography": [
        "The aperture controls how much light enters the lens and the depth of field.",
        "A faster shutter speed freezes motion while a slower one blurs it.",
        "Higher ISO values brighten the image but add noise.",
        "The rule of thirds places the subject along imaginary grid lines.",
        "Golden hour light just after sunrise or before sunset is soft and warm.",
        "A tripod keeps the camera still for long exposures.",
        "Shooting in raw format keeps more detail for editing later.",
        "A wide-angle lens exaggerates the distance between near and far objects.",
    ],
    "chess": [
        "Controlling the centre early gives the pieces more room to move.",
        "Castling moves the king to safety and brings a rook into play.",
        "A knight moves in an L shape and can jump over other pieces.",
        "Doubled pawns are often a weakness because they cannot protect each other.",
        "In the endgame the king becomes an active, strong piece.",
        "A fork attacks two pieces at once so that one of them is lost.",
        "Developing minor pieces before moving the queen is a common opening principle.",
        "Stalemate happens when the player to move has no legal move and is not in check.",
    ],
    "volcanoes": [
        "Magma that reaches the surface is called lava.",
        "Shield volcanoes have gentle slopes built from runny basalt lava flows.",
        "Stratovolcanoes are steep and can erupt explosively.",
        "The Pacific Ring of Fire holds most of the world's active volcanoes.",
        "Volcanic ash can travel thousands of kilometres and disrupt air travel.",
        "Pyroclastic flows are fast clouds of hot gas and rock.",
        "Volcanic soils are often very fertile because of their minerals.",
        "Scientists watch for small earthquakes and ground swelling before eruptions.",
    ],
    "coffee": [
        "Arabica beans are usually sweeter and less bitter than robusta beans.",
        "Roasting turns green coffee beans brown and develops their aroma.",
        "Water just below boiling, around 93 degrees Celsius, suits most brewing methods.",
        "A finer grind extracts faster, so espresso uses a very fine grind.",
        "Freshly ground beans keep more flavour than pre-ground coffee.",
        "Cold brew steeps coffee in cold water for many hours and tastes less acidic.",
        "Coffee plants grow best in tropical highlands with steady rainfall.",
        "Caffeine is a natural stimulant that blocks the signals of tiredness.",
    ],
}

QUESTIONS = [
    "Can you tell me something about {topic}?",
    "I have been reading about {topic}. What are the key things to know?",
    "What should a beginner understand about {topic}?",
    "Could you explain a few facts about {topic}?",
    "My friend keeps talking about {topic}. Can you give me the basics?",
]
SWITCHES = ["", "Thanks, that helps. ", "Great. Now a different subject. ", "Interesting! Let me change topics. "]
SYSTEM_PROMPTS = [
    "You are a helpful assistant. Answer accurately and follow the user's formatting requests.",
    "You are a friendly tutor who gives short, factual answers.",
    "You are an assistant that answers questions clearly and stays on topic.",
]
OPENERS = ["", "Here is what I know. ", "Good question. ", "Sure. "]


def _bullets(sentences: list[str]) -> str:
    return "\n".join(f"- {s}" for s in sentences)


def _numbered(sentences: list[str]) -> str:
    return "\n".join(f"{i}. {s}" for i, s in enumerate(sentences, 1))


def _prose(sentences: list[str]) -> str:
    return " ".join(sentences)


# instruction -> (the sentence added to the last user turn, how a compliant answer is formatted)
INSTRUCTIONS: dict[str, tuple[str, Callable[[list[str]], str]]] = {
    "none": ("", _prose),
    "bullets": ("Please answer as a bulleted list.", _bullets),
    "numbered": ("Please answer as a numbered list.", _numbered),
    "lowercase": ("Please write your answer in lowercase letters only.", lambda s: _prose(s).lower()),
    "opening": ("Begin your answer with the words 'In short:'.", lambda s: "In short: " + _prose(s)),
}


def corpus() -> Iterator[str]:
    """Every phrase the generator can emit (to train the tiny backbone's tokenizer on before measuring)."""
    for sentences in TOPICS.values():
        yield from sentences
        yield _bullets(sentences)
        yield _numbered(sentences)
        yield _prose(sentences).lower()
    for topic in TOPICS:
        yield from (q.format(topic=topic) for q in QUESTIONS)
    yield from SWITCHES
    yield from SYSTEM_PROMPTS
    yield from OPENERS
    yield from (text for text, _ in INSTRUCTIONS.values())


class _Counter:
    """Token counts with the backbone's tokenizer: prompts as the chat template renders them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, messages: list[dict[str, str]]) -> int:
        return self.text(self.tokenizer.apply_chat_template(messages, tokenize=False))


def _response(rng: random.Random, count: _Counter, topic: str, fmt: Callable[[list[str]], str]) -> str:
    """`fmt` applied to facts of `topic`, 20-120 tokens, its length drawn independently of anything else."""
    lo, hi = RESPONSE_TOKENS
    for _ in range(MAX_TRIES):
        target = rng.randint(lo, hi)
        facts = rng.sample(TOPICS[topic], len(TOPICS[topic]))
        opener = rng.choice(OPENERS) if fmt is _prose else ""
        sentences: list[str] = []
        while facts and count.text(opener + fmt(sentences)) < target:
            sentences.append(facts.pop())
        text = opener + fmt(sentences)
        if lo <= count.text(text) <= hi:
            return text
    raise RuntimeError(f"no {topic!r} response within {RESPONSE_TOKENS} tokens after {MAX_TRIES} draws")


def _prompt(rng: random.Random, count: _Counter, topic: str, instruction: str) -> tuple[list[dict[str, str]], list[str]]:
    """(messages, topics of the earlier user turns): at least one earlier exchange, 100-400 tokens in all."""
    lo, hi = PROMPT_TOKENS
    others = [t for t in TOPICS if t != topic]
    for _ in range(MAX_TRIES):
        target = rng.randint(lo, hi)
        head = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
        last = (rng.choice(SWITCHES) + rng.choice(QUESTIONS).format(topic=topic) + " "
                + INSTRUCTIONS[instruction][0]).strip()
        history: list[dict[str, str]] = []
        earlier: list[str] = []
        while not earlier or count.prompt(head + history + [{"role": "user", "content": last}]) < target:
            past = rng.choice([t for t in others if t not in earlier] or others)
            earlier.append(past)
            n_facts = rng.randint(1, 4)
            history += [{"role": "user", "content": rng.choice(QUESTIONS).format(topic=past)},
                        {"role": "assistant", "content": _prose(rng.sample(TOPICS[past], n_facts))}]
        messages = head + history + [{"role": "user", "content": last}]
        if lo <= count.prompt(messages) <= hi:
            return messages, earlier
    raise RuntimeError(f"no prompt within {PROMPT_TOKENS} tokens after {MAX_TRIES} draws")


def make_long_pairs(n_pairs: int, seed: int, tokenizer) -> pd.DataFrame:
    """`n_pairs` preference pairs with the columns (and dtypes) of a split parquet file."""
    rng = random.Random(seed)
    count = _Counter(tokenizer)
    rows = []
    for i in range(n_pairs):
        topic = rng.choice(list(TOPICS))
        instruction = rng.choice(list(INSTRUCTIONS))
        messages, earlier = _prompt(rng, count, topic, instruction)
        fmt = INSTRUCTIONS[instruction][1]
        chosen = _response(rng, count, topic, fmt)
        # Off-topic (an earlier turn's topic, same format) or, when there is an instruction, ignoring it.
        if instruction == "none" or rng.random() < 0.5:
            rejected, flaw = _response(rng, count, rng.choice(earlier), fmt), "earlier_topic"
        else:
            rejected, flaw = _response(rng, count, topic, _prose), "ignores_instruction"
        if rejected == chosen:  # cannot happen with distinct topics/formats; a pair must differ
            raise RuntimeError(f"pair {i}: chosen and rejected are identical")
        canonical = canonical_messages(to_messages(messages))
        rows.append({
            "pair_id": pair_id(canonical, chosen, rejected), "prompt": canonical, "chosen": chosen,
            "rejected": rejected, "n_votes": 3, "n_chosen": 3, "n_rejected": 0, "n_tie": 0, "agreement": 1.0,
            "soft_label": 1.0, "margin": 0.0, "prompt_hash": messages_hash(to_messages(messages)), "split": "train",
            "batch_ids": [f"long_prompts:{flaw}:{instruction}"],
        })
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def make_long_groups(n_groups: int, seed: int, tokenizer) -> pd.DataFrame:
    """`n_groups` prompts, each with 4 ranked responses and all 6 comparisons (a ranked row, aggregated).

    Best first: on topic and following the instruction; on topic, ignoring it (a second on-topic draw when
    there is none); an earlier turn's topic, following it; another earlier topic in plain prose.
    """
    rng = random.Random(seed)
    count = _Counter(tokenizer)
    rows = []
    for g in range(n_groups):
        topic = rng.choice(list(TOPICS))
        instruction = rng.choice(list(INSTRUCTIONS))
        messages, earlier = _prompt(rng, count, topic, instruction)
        fmt = INSTRUCTIONS[instruction][1]
        ranked: list[str] = []
        for chosen_topic, chosen_fmt in ((topic, fmt), (topic, _prose), (rng.choice(earlier), fmt),
                                         (rng.choice(earlier), _prose)):
            for _ in range(MAX_TRIES):
                text = _response(rng, count, chosen_topic, chosen_fmt)
                if text not in ranked:
                    break
            else:
                raise RuntimeError(f"group {g}: no distinct response after {MAX_TRIES} draws")
            ranked.append(text)
        canonical = canonical_messages(to_messages(messages))
        digest = messages_hash(to_messages(messages))
        for i in range(4):
            for j in range(i + 1, 4):
                rows.append({
                    "pair_id": pair_id(canonical, ranked[i], ranked[j]), "prompt": canonical, "chosen": ranked[i],
                    "rejected": ranked[j], "n_votes": 1, "n_chosen": 1, "n_rejected": 0, "n_tie": 0,
                    "agreement": 1.0, "soft_label": 1.0, "margin": 0.0, "prompt_hash": digest, "split": "train",
                    "batch_ids": [f"long_groups:{instruction}"],
                })
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)
