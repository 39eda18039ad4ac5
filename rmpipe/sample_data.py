"""Deterministic sample preference batches: the bundled default data and the benchmark generator.

Every comparison is a good response (the ground truth) against one with a single,
clear flaw of a known kind: a refusal, waffle that never answers, a wrong fact, a
rude tone, or an off-topic answer. Each flaw leaves a lexical or stylistic trace a
tiny transformer can learn in minutes. Phrasings are composed from slots (hundreds of
refusals, rude openers, hedges; trivia on many subjects; each fact stated several ways)
so the model learns the general signal: the evaluation "unit battery" shares their
style but none of their sentences (tests/test_sample_data.py checks that).

Crowd realism: ~12 annotators judge each pair (3-5 each) with the A/B order drawn
per vote; most are good, one is careless (near-random), one always answers "a",
and one good annotator casts over 30% of all votes.

All randomness comes from generators seeded by `seed`: the same params give
byte-identical files.
"""

from __future__ import annotations

import csv
import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rmpipe.errors import ConfigError, UserError
from rmpipe.hf_batches import folder_kind
from rmpipe.io import atomic_path
from rmpipe.params import get

# ----------------------------------------------------------------------------------------------
# Vocabulary (reused by the evaluation unit battery)
# ----------------------------------------------------------------------------------------------


# Generic answer shapes: the value alone after the question, so the model must connect the
# value to the *question* (not only to the words around it in the answer) to judge it.
FACT_ANSWER_SHAPES: tuple[str, ...] = ("The answer is {}.", "That would be {}.", "The correct answer is {}.")


@dataclass(frozen=True)
class Fact:
    """A checkable fact: `statement.format(right)` is true, `statement.format(wrong)` is subtly false."""

    question: str
    statement: str
    right: str
    wrong: str

    def say(self, value: str) -> str:
        return self.statement.format(value)

    @property
    def phrasings(self) -> tuple[str, ...]:
        """Every way a generated answer states this fact (each with one `{}` for the value).

        The statement, its inversion where it reads "The X is {}." ("{} is the X."), and the
        generic shapes: several phrasings make the model learn the fact, not one template.
        """
        forms = [self.statement]
        if self.statement.startswith("The ") and self.statement.endswith(" is {}."):
            forms.append("{} is the " + self.statement[len("The "):-len(" is {}.")] + ".")
        return (*forms, *FACT_ANSWER_SHAPES)


FACTS: tuple[Fact, ...] = (
    Fact("What is the capital of France?", "The capital of France is {}.", "Paris", "Lyon"),
    Fact("What is the capital of Germany?", "The capital of Germany is {}.", "Berlin", "Munich"),
    Fact("What is the capital of Italy?", "The capital of Italy is {}.", "Rome", "Milan"),
    Fact("What is the capital of Spain?", "The capital of Spain is {}.", "Madrid", "Barcelona"),
    Fact("What is the capital of Japan?", "The capital of Japan is {}.", "Tokyo", "Osaka"),
    Fact("What is the capital of Canada?", "The capital of Canada is {}.", "Ottawa", "Toronto"),
    Fact("What is the capital of Australia?", "The capital of Australia is {}.", "Canberra", "Sydney"),
    Fact("What is the capital of Brazil?", "The capital of Brazil is {}.", "Brasilia", "Rio de Janeiro"),
    Fact("What is the capital of Turkey?", "The capital of Turkey is {}.", "Ankara", "Istanbul"),
    Fact("What is the capital of Egypt?", "The capital of Egypt is {}.", "Cairo", "Alexandria"),
    Fact("What is the capital of Kenya?", "The capital of Kenya is {}.", "Nairobi", "Mombasa"),
    Fact("What is the capital of Norway?", "The capital of Norway is {}.", "Oslo", "Bergen"),
    Fact("What is the capital of Portugal?", "The capital of Portugal is {}.", "Lisbon", "Porto"),
    Fact("What is the capital of India?", "The capital of India is {}.", "New Delhi", "Mumbai"),
    Fact("At what temperature does water boil at sea level?",
         "At sea level, water boils at {} degrees Celsius.", "100", "90"),
    Fact("At what temperature does water freeze?", "Water freezes at {} degrees Celsius.", "0", "10"),
    Fact("Which planet is closest to the Sun?", "The planet closest to the Sun is {}.", "Mercury", "Venus"),
    Fact("Which is the largest planet in the solar system?",
         "The largest planet in the solar system is {}.", "Jupiter", "Saturn"),
    Fact("Which planet is known as the Red Planet?", "The Red Planet is {}.", "Mars", "Mercury"),
    Fact("How many planets are in the solar system?", "There are {} planets in the solar system.", "eight", "nine"),
    Fact("How many moons does Earth have?", "Earth has {} moon.", "one", "two"),
    Fact("What is the chemical symbol for gold?", "The chemical symbol for gold is {}.", "Au", "Ag"),
    Fact("What is the chemical symbol for iron?", "The chemical symbol for iron is {}.", "Fe", "Ir"),
    Fact("What is the chemical symbol for sodium?", "The chemical symbol for sodium is {}.", "Na", "So"),
    Fact("What is the atomic number of oxygen?", "The atomic number of oxygen is {}.", "8", "6"),
    Fact("How many bones are in the adult human body?",
         "An adult human body has {} bones.", "206", "208"),
    Fact("How many chambers does the human heart have?", "The human heart has {} chambers.", "four", "three"),
    Fact("How many legs does a spider have?", "A spider has {} legs.", "eight", "six"),
    Fact("How many sides does a hexagon have?", "A hexagon has {} sides.", "six", "eight"),
    Fact("What do the angles of a triangle add up to?",
         "The angles of a triangle add up to {} degrees.", "180", "360"),
    Fact("What is the square root of 144?", "The square root of 144 is {}.", "12", "14"),
    Fact("What is 7 times 8?", "7 times 8 is {}.", "56", "54"),
    Fact("How many days does a leap year have?", "A leap year has {} days.", "366", "365"),
    Fact("What is the highest mountain on Earth?", "The highest mountain on Earth is {}.", "Mount Everest", "K2"),
    Fact("What is the largest ocean on Earth?", "The largest ocean on Earth is the {} Ocean.", "Pacific", "Atlantic"),
    Fact("Who wrote Hamlet?", "Hamlet was written by {}.", "William Shakespeare", "Charles Dickens"),
    Fact("Who painted the Mona Lisa?", "The Mona Lisa was painted by {}.", "Leonardo da Vinci", "Michelangelo"),
    Fact("In which year did World War II end?", "World War II ended in {}.", "1945", "1939"),
    Fact("In which year did humans first land on the Moon?",
         "Humans first landed on the Moon in {}.", "1969", "1972"),
    Fact("Who created the Python programming language?",
         "Python was created by {}.", "Guido van Rossum", "Linus Torvalds"),
    Fact("What gas do plants release during photosynthesis?",
         "During photosynthesis, plants release {}.", "oxygen", "nitrogen"),
    Fact("How many minutes are in an hour?", "There are {} minutes in an hour.", "60", "100"),
)

def _compose(*slots: tuple[str, ...]) -> tuple[str, ...]:
    """Every combination of one option per slot, joined by spaces (empty options skipped), first
    letter capitalized: a few short lists give hundreds of phrasings, so the model learns the
    signal (an apology plus "can't help", a dismissive tone) rather than a handful of strings."""
    out = []
    for combo in itertools.product(*slots):
        text = " ".join(part for part in combo if part)
        out.append(text[0].upper() + text[1:])
    return tuple(out)


REFUSALS: tuple[str, ...] = _compose(
    ("I'm sorry, but", "Sorry, but", "Unfortunately,", "I apologize, but", "I'm afraid", "Apologies, but",
     "As an AI assistant,", "Regrettably,", "I'm really sorry, but", ""),
    ("I can't", "I cannot", "I won't", "I am not able to", "I'm unable to", "I must decline to",
     "I'm not allowed to", "I am not permitted to", "I will not", "I'm not in a position to"),
    ("help with this.", "help you with that.", "assist with this request.", "answer this question.",
     "respond to that.", "provide that information.", "go into this topic.", "give advice on this.",
     "answer questions like this.", "assist you here.", "discuss this.", "help with your request."),
)
REFUSAL_REASONS: tuple[str, ...] = (  # policy excuses a refusal may add ({s}: what was asked about)
    "It falls outside what I am allowed to discuss.",
    "I have to be careful about requests like this one.",
    "Please consult another source for this.",
    "I hope you understand.",
    "This is not a topic I can cover.",
    "My guidelines do not let me go into it.",
    "I can't go into {s} here.",
    "It goes against the policies I follow.",
    "You may want to ask a professional about {s} instead.",
    "I'm not comfortable giving guidance on {s}.",
    "This request conflicts with my content policy.",
    "Perhaps try searching online.",
)
WAFFLE_SENTENCES: tuple[str, ...] = _compose(  # hedging that never commits to an answer
    ("Well,", "Honestly,", "In a way,", "To be fair,", "Generally speaking,", "Of course,", "Interestingly,",
     "At the end of the day,", ""),
    ("it really depends on a lot of different factors.", "there are many ways to look at {s}.",
     "there is no simple answer here.", "some people see it one way, and others see it quite differently.",
     "it is worth weighing every perspective before deciding anything.", "it can vary a lot from case to case.",
     "it is hard to say much about {s} without more context.", "there are pros and cons to almost everything.",
     "experts have debated {s} for years without fully agreeing.", "it's up to you to decide what feels right.",
     "it is simple in some ways and complicated in others.", "that is a fascinating question with a long history.",
     "one could say a great deal about {s}.", "there are always exceptions and special cases to keep in mind.",
     "it may be worth reflecting on it a little longer."),
)
RUDE_OPENERS: tuple[str, ...] = _compose(  # a dismissive opener, often with an insult
    ("Ugh.", "Seriously?", "Come on.", "Oh please.", "Really?", "Sigh.", "Wow.", "Are you kidding me?",
     "Not this again.", "Ugh, fine."),
    ("What a lazy question.", "That's a dumb question.", "Everybody knows that.", "This is basic stuff.",
     "How do you not know this?", "Pay attention for once.", "I can't believe you need help with this.",
     "Obviously.", "Use your head.", ""),
)
RUDE_CLOSERS: tuple[str, ...] = (
    "Don't waste my time again.",
    "Figure it out yourself next time.",
    "Honestly, try harder.",
    "Was that so hard to look up?",
    "Google it yourself.",
    "Stop bothering me with this.",
    "Do your own homework next time.",
    "Read a book once in a while.",
    "It's not rocket science.",
    "Look things up before you ask.",
)
POLITE_OPENERS: tuple[str, ...] = (
    "Happy to help!",
    "Great question!",
    "Sure thing.",
    "Of course.",
    "Thanks for asking!",
    "Good question.",
    "Certainly!",
    "Glad you asked.",
    "Absolutely.",
    "Sure, happy to explain.",
)
POLITE_CLOSERS: tuple[str, ...] = (
    "Hope this helps!",
    "Let me know if you have more questions.",
    "Good luck!",
    "Feel free to ask a follow-up.",
    "Have fun with it!",
    "Enjoy!",
)
OFF_TOPIC_SENTENCES: tuple[str, ...] = tuple(  # fluent trivia about something else entirely
    sentence
    for template, slot in (
        ("{} are a great source of vitamins.", ("Bananas", "Oranges", "Carrots", "Lentils", "Almonds", "Kiwis")),
        ("The {} is one of the most visited places in the world.",
         ("Eiffel Tower", "Great Wall", "Colosseum", "Taj Mahal", "Statue of Liberty", "Sydney Opera House")),
        ("The {} was finished many centuries ago.", ("Great Wall", "Colosseum", "Taj Mahal", "Notre-Dame")),
        ("Did you know that {}?", ("octopuses have three hearts", "honey never really spoils",
                                    "sharks are older than trees", "a day on Venus is longer than its year",
                                    "koalas sleep most of the day", "some turtles breathe through their tails")),
        ("My favorite {} is autumn.", ("season", "time of year")),
        ("By the way, the weather in {} has been lovely this week.", ("Lisbon", "Seattle", "Nairobi", "my town")),
        ("Speaking of something else, {} music started in the last century.", ("jazz", "rock", "hip hop", "techno")),
        ("Fun fact: {} can sleep for most of the day.", ("cats", "sloths", "lions", "bats")),
        ("Penguins cannot fly, but {}.", ("they are excellent swimmers", "they can dive very deep")),
        ("The best {}, in my opinion, has extra cheese.", ("pizza", "lasagna", "sandwich", "omelette")),
        ("{} was invented a very long time ago.", ("Chess", "Paper", "The wheel", "Glass", "Soap")),
        ("{} turn to follow the sun when they are young.", ("Sunflowers", "Some plants")),
        ("The {} is about {} metres tall.", None),
        ("{} is a popular sport in many countries.", ("Cricket", "Basketball", "Volleyball", "Rugby", "Tennis")),
        ("A group of {} is called a {}.", None),
        ("The {} is the longest river in {}.", None),
        ("The first {} was built in {}.", None),
        ("A {} can run at up to {} kilometres per hour.", None),
        ("{} has a population of about {} million people.", None),
        ("The {} weighs about {} kilograms.", None),
    )
    for sentence in (
        [template.format(*pair) for pair in {
            "The {} is about {} metres tall.": (("Eiffel Tower", "300"), ("Big Ben tower", "96"),
                                                 ("Leaning Tower of Pisa", "56"), ("Statue of Liberty", "93")),
            "A group of {} is called a {}.": (("crows", "murder"), ("lions", "pride"), ("owls", "parliament"),
                                               ("fish", "school"), ("geese", "gaggle")),
            "The {} is the longest river in {}.": (("Nile", "Africa"), ("Amazon", "South America"),
                                                    ("Danube", "the European Union"), ("Yangtze", "Asia")),
            "The first {} was built in {}.": (("steam train", "1804"), ("bicycle", "1817"), ("skyscraper", "1885"),
                                              ("submarine", "1620"), ("telescope", "1608"), ("car", "1886")),
            "A {} can run at up to {} kilometres per hour.": (("cheetah", "110"), ("horse", "88"), ("ostrich", "70"),
                                                              ("kangaroo", "71"), ("rabbit", "60")),
            "{} has a population of about {} million people.": (("Peru", "34"), ("Ghana", "33"), ("Sweden", "10"),
                                                                 ("Vietnam", "98"), ("Chile", "19")),
            "The {} weighs about {} kilograms.": (("blue whale", "150000"), ("polar bear", "450"),
                                                  ("giraffe", "800"), ("grand piano", "400")),
        }[template]] if slot is None else [template.format(value) for value in slot]
    )
)
FACT_EXTRAS: tuple[str, ...] = (  # what a good answer to a fact question may add
    "You can double-check this in any encyclopedia.",
    "This comes up often in quizzes.",
    "It is a common point of confusion, so it's a good question.",
    "Many people remember it from school.",
    "It is one of those facts worth remembering.",
)
HELPFUL_SENTENCES: tuple[str, ...] = (
    "Start with {s} for ten minutes a day and build up from there.",
    "Break {s} into small steps and finish one step at a time.",
    "Write down what worked with {s} so you can repeat it.",
    "Ask someone experienced with {s} to watch you and give feedback.",
    "Set one clear, realistic goal for {s} each week.",
    "Keep everything you need for {s} in one place.",
    "If {s} feels hard, slow down and check the basics first.",
    "Track your progress with {s} in a simple notebook.",
    "Take short breaks, because rest is part of getting better at {s}.",
    "Compare two approaches to {s} and keep the one that works better.",
    "A good first step with {s} is to decide what success looks like.",
    "Practice {s} at the same time every day to build a habit.",
    "Most people see real progress with {s} within a few weeks if they keep at it.",
    "This works because small, steady changes are easier to keep up than big ones.",
    "If something goes wrong, check the simplest cause first and fix one thing at a time.",
    "Plan a little time at the end of each week to look back at what you did.",
    "Try to keep sessions short and focused rather than long and tiring.",
    "Avoid doing too much at once, since that is the most common reason people give up.",
    "Pick a quiet place and a regular time, then remove anything that distracts you.",
    "When you get stuck, look at a simple example and copy what it does.",
)
ADVICE_ACTIONS: tuple[str, ...] = ("set a regular time for it and stick to it.", "keep your tools clean and within reach.",
     "write a short list before you start.", "ask a friend to join you for support.",
     "drink some water and take short breaks.", "read the instructions once before you begin.",
     "switch it off and unplug it before cleaning it.", "measure everything before you begin.",
     "keep the room quiet, cool and well lit.", "use a timer and work for twenty minutes at a time.",
     "warm up for five minutes so you do not strain anything.", "start with the easiest part to build confidence.",
     "save a little every week, even if it is a small amount.", "write down one thing you learned each day.",
     "test a small piece first before doing the whole thing.", "choose comfortable clothes and good shoes.",
     "repeat the basic movement slowly until it feels natural.", "check the settings and reset them to the defaults.",
     "put your phone in another room while you work.", "cook a simple version first and adjust the seasoning later.",
     "go to bed and get up at the same time each day.", "stretch gently afterwards to help your muscles recover.",
     "replace the filter or battery if it is old.", "mix the ingredients in a large bowl and let them rest.",
     "practise with short, easy examples before harder ones.", "keep notes in one place so nothing gets lost.",
)
ADVICE_STEPS: tuple[str, ...] = (  # concrete how-to steps that need not name the subject: "Next, do X."
    *_compose(("First,", "Next,", "Then,", "Also,", "Finally,", "If you can,", ""), ADVICE_ACTIONS),
    *_compose(("A simple option is to", "One easy way is to", "The best approach is to", "What helps most is to",
               "A good habit is to", "It is worth trying to"), ADVICE_ACTIONS),  # "An easy option is X." too
)
EXPLANATIONS: tuple[str, ...] = (  # the "why" a longer, explanatory answer adds
    "This works because small, regular efforts add up over time.",
    "The reason is that your body and mind adapt best to a steady routine.",
    "That way you notice problems early, while they are still easy to fix.",
    "Doing it this way saves time and avoids most beginner mistakes.",
    "It helps because you can see your progress, which keeps you motivated.",
    "Most problems come from rushing, so going slowly pays off.",
)
FLAW_KINDS: tuple[str, ...] = ("refusal", "waffle", "wrong_fact", "rude", "off_topic")
# How blatant each flaw is, as an annotator would label it (stronger for more blatant flaws).
FLAW_STRENGTH: dict[str, str] = {
    "refusal": "strong",
    "waffle": "moderate",
    "wrong_fact": "slight",
    "rude": "moderate",
    "off_topic": "very_strong",
}
STRENGTHS: tuple[str, ...] = ("slight", "moderate", "strong", "very_strong")

# --- prompt slots --------------------------------------------------------------------------
NAMES = ("Alice", "Bob", "Carmen", "Dmitri", "Emeka", "Fatima", "Greta", "Hiro", "Ines", "Jamal",
         "Kofi", "Lena", "Mateo", "Nadia", "Oscar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
         "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zoe")
RELATIONS = ("friend", "sister", "brother", "coworker", "neighbor", "teacher", "roommate", "uncle")
ACTIVITIES = ("learning to swim", "running a marathon", "baking sourdough bread", "learning Spanish",
              "playing the guitar", "growing tomatoes", "saving money", "writing a novel",
              "studying for exams", "painting with watercolors", "training a puppy", "public speaking",
              "learning to code", "rock climbing", "keeping a journal", "cooking for a big family",
              "fixing a bike", "meditating", "knitting a scarf", "planning a road trip")
OBJECTS = ("refrigerator", "bicycle gear", "solar panel", "microwave oven", "compass", "thermostat",
           "vacuum cleaner", "sewing machine", "telescope", "electric kettle", "camera lens",
           "smoke detector", "water filter", "wind turbine", "pressure cooker")
TOPICS = ("recycling", "sleep", "vaccines", "bees", "the water cycle", "compound interest",
          "democracy", "photosynthesis", "volcanoes", "the printing press", "exercise", "rainforests",
          "electric cars", "libraries", "the immune system")
AUDIENCES = ("a ten-year-old", "my grandmother", "a beginner", "a high school class", "a busy manager")
EVENTS = ("the team dinner on Friday", "moving the meeting to Monday", "their new job",
          "the school concert", "returning the borrowed ladder", "the project deadline")
PETS = ("cat", "dog", "parrot", "hamster", "goldfish", "rabbit", "turtle")
THINGS = ("naps", "cheese", "the beach", "music", "long walks", "snow", "cardboard boxes")
ITEMS = ("apples", "old jars", "paper bags", "pencils", "spare tiles", "potatoes", "balloons")
SUBJECTS = ("geography", "science", "history", "chemistry", "general knowledge")
QUOTES = ("practice makes perfect", "never skip a day", "start with the hardest part",
          "less is more", "slow and steady wins")
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly and concise assistant.",
    "You are a knowledgeable tutor. Answer clearly.",
    "You are an assistant that gives practical advice.",
)
EARLIER_TURNS = (
    ("Hi! Can you help me with something?", "Of course, what do you need?"),
    ("I have a quick question.", "Sure, go ahead."),
    ("Are you there?", "Yes, I'm here. How can I help?"),
)
FACT_FRAMES = (
    "{q}",
    "Quick question: {q}",
    "My {relation} {name} says I'm wrong about this. {q}",
    "For my {subject} homework: {q}",
    "I'm preparing a quiz for {audience}. {q} Please answer in one sentence.",
    "{name} asked me this today and I wasn't sure. {q}",
    "Settle a bet for me: {q}",
)
TASK_FRAMES = (
    ("Give me {n} tips for {activity}.", "activity"),
    ("How do I get better at {activity}?", "activity"),
    ("What should I keep in mind when {activity}?", "activity"),
    ("Can you explain how a {object} works to {audience}?", "object"),
    ("My {object} stopped working. How do I take care of a {object} properly?", "object"),
    ("Summarize why {topic} matters in {n} sentences.", "topic"),
    ("Write a short message to {name} about {event}.", "event"),
    ("Suggest a name for my {pet} who loves {thing}.", "thing"),
    ('My {relation} {name} said "{quote}" about {activity}. Is that good advice?', "activity"),
    ("I have {n} {items} and a free afternoon. What can I do with them?", "items"),
    ("Here is my plan for this week:\n- {activity}\n- call {name}\nHow should I organise it?", "activity"),
)
PROMPT_OPENERS = (  # optional lead-ins: real prompts rarely start with the bare question
    "Hi, I'm {name}.", "I'm {age} and curious.", "Asking for my {relation} {name}.", "Hello!",
    "This is for a {subject} class.", "I've wondered about this for {n} years.", "Hey there.",
    "My {relation} and I were talking about this over dinner.", "Sorry if this is a silly question.",
)
PROMPT_CLOSERS = (
    "Thanks!", "Please keep it short.", "Thanks in advance, {name}.", "I need it by {day}.",
    "Explain it simply, please.", "I'm {age}, if that matters.",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "the weekend", "tomorrow", "tonight")
CONTEXT_SENTENCES = (  # long_texts=True: background a user pastes before the question
    "I have been thinking about {activity} for a while now, and my {relation} {name} suggested I ask.",
    "Last month I tried {activity} twice, and both times I gave up after a few days.",
    "We recently bought a {object}, and nobody in the house really understands it.",
    "Our {subject} teacher mentioned {topic} in class, but the explanation went too fast.",
    "For context, I work long hours and only have evenings and weekends free.",
    "I have read a few articles online, but they contradict each other in small ways.",
    "My budget is limited, so I would rather not buy expensive equipment.",
    "I tend to lose motivation quickly when I can't see progress.",
    "The {items} are in the garage, next to the {object} we never use.",
    "{name} says the key is {quote}, but I am not fully convinced.",
)

# Annotator crowd: (id, kind, accuracy for "good" annotators, weight of being drawn for a pair).
DOMINANT_ANNOTATOR = "ann-01"
CARELESS_ANNOTATOR = "ann-11"
ALWAYS_A_ANNOTATOR = "ann-12"
ANNOTATORS: tuple[tuple[str, str, float, float], ...] = (
    (DOMINANT_ANNOTATOR, "good", 0.985, 0.0),  # weight unused: judges every pair
    ("ann-02", "good", 0.98, 1.0),
    ("ann-03", "good", 0.975, 1.0),
    ("ann-04", "good", 0.97, 1.0),
    ("ann-05", "good", 0.98, 1.0),
    ("ann-06", "good", 0.965, 1.0),
    ("ann-07", "good", 0.975, 1.0),
    ("ann-08", "good", 0.97, 1.0),
    ("ann-09", "good", 0.98, 1.0),
    ("ann-10", "good", 0.965, 1.0),
    (CARELESS_ANNOTATOR, "careless", 0.5, 0.3),
    (ALWAYS_A_ANNOTATOR, "always_a", 0.5, 0.3),
)
VOTES_PER_PAIR = {3: 0.82, 4: 0.13, 5: 0.05}  # mostly 3: lets one annotator hold > 30% of votes
# A good annotator's tie / error rates scale with how subtle the flaw is.
TIE_RATE = {"slight": 0.06, "moderate": 0.045, "strong": 0.03, "very_strong": 0.02}
ERROR_SCALE = {"slight": 1.4, "moderate": 1.0, "strong": 0.6, "very_strong": 0.4}
MISSING_STRENGTH_RATE = 0.04  # annotators sometimes leave the strength blank


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleConfig:
    seed: int
    n_pairs: int  # comparisons delivered as vote rows
    n_batches: int  # vote-row files, alternating .jsonl / .csv
    pair_rows: int  # extra comparisons delivered as already-judged pair rows (.parquet)
    long_texts: bool  # benchmark mode: prompts of 300-3000 chars, responses of a few hundred
    votes_per_pair: Mapping[int, float]  # {votes: probability}; the dominant annotator is in every pair

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "SampleConfig":
        where = "sample_data"
        optional = {"pair_rows": 0, "long_texts": False, "votes_per_pair": VOTES_PER_PAIR, **cfg}
        parsed = cls(
            seed=get(cfg, "seed", int, where),
            n_pairs=get(cfg, "n_pairs", int, where),
            n_batches=get(cfg, "n_batches", int, where),
            pair_rows=get(optional, "pair_rows", int, where),
            long_texts=get(optional, "long_texts", bool, where),
            votes_per_pair=get(optional, "votes_per_pair", dict, where),
        )
        if parsed.n_pairs < 1 or parsed.n_batches < 1 or parsed.pair_rows < 0:
            raise ConfigError("params.yaml: sample_data.n_pairs and n_batches must be >= 1, pair_rows >= 0")
        counts, shares = list(parsed.votes_per_pair), list(parsed.votes_per_pair.values())
        if not all(isinstance(k, int) and 1 <= k <= len(ANNOTATORS) for k in counts) or abs(sum(shares) - 1) > 1e-6:
            raise ConfigError(
                f"params.yaml: sample_data.votes_per_pair must map vote counts (1-{len(ANNOTATORS)}) "
                f"to shares summing to 1, got {dict(parsed.votes_per_pair)}"
            )
        return parsed


# ----------------------------------------------------------------------------------------------
# Texts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prompt:
    text: str  # the user's request
    subject: str  # what a helpful answer talks about
    fact: Fact | None
    delivered: Any  # str, or a list of chat messages


def _pick(rng: random.Random, options):
    """rng.choice, about 3x faster (it matters for 250k-pair benchmark sets)."""
    return options[int(rng.random() * len(options))]


def _slots(rng: random.Random) -> dict[str, Any]:
    return {
        "name": _pick(rng, NAMES), "relation": _pick(rng, RELATIONS), "activity": _pick(rng, ACTIVITIES),
        "object": _pick(rng, OBJECTS), "topic": _pick(rng, TOPICS), "audience": _pick(rng, AUDIENCES),
        "event": _pick(rng, EVENTS), "pet": _pick(rng, PETS), "thing": _pick(rng, THINGS),
        "items": _pick(rng, ITEMS), "subject": _pick(rng, SUBJECTS), "quote": _pick(rng, QUOTES),
        "n": rng.randint(2, 9), "age": rng.randint(12, 80), "day": _pick(rng, DAYS),
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


def _make_prompt(rng: random.Random, long_texts: bool) -> _Prompt:
    slots = _slots(rng)
    if rng.random() < 0.4:
        fact = _pick(rng, FACTS)
        text = _pick(rng, FACT_FRAMES).format(q=fact.question, **slots)
        subject = "this question"
    else:
        fact = None
        frame, key = _pick(rng, TASK_FRAMES)
        text = frame.format(**slots)
        subject = str(slots[key])
    if rng.random() < 0.6:
        text = f"{_pick(rng, PROMPT_OPENERS).format(**slots)} {text}"
    if rng.random() < 0.4:
        text = f"{text} {_pick(rng, PROMPT_CLOSERS).format(**slots)}"
    if long_texts:  # a pasted background of 300-3000 chars (log-uniform) before the question
        target = int(300 * 10 ** rng.random())
        text = " ".join(_fill(rng, CONTEXT_SENTENCES, target - len(text), slots)) + "\n\n" + text
    delivered: Any = text
    if rng.random() < 0.2:  # chat-message delivery, sometimes multi-turn
        delivered = [{"role": "system", "content": _pick(rng, SYSTEM_PROMPTS)}]
        if rng.random() < 0.3:
            user, assistant = _pick(rng, EARLIER_TURNS)
            delivered += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        delivered.append({"role": "user", "content": text})
    return _Prompt(text, subject, fact, delivered)


def _core_answer(rng: random.Random, prompt: _Prompt, n_sentences: int, long_texts: bool) -> tuple[str, str]:
    """The substance of a good answer and the phrasing its fact is stated in ("" when no fact was
    asked): the fact in one of its phrasings, or helpful sentences about the subject."""
    slots = {"s": prompt.subject}
    phrasing = _pick(rng, prompt.fact.phrasings) if prompt.fact else ""
    parts = [phrasing.format(prompt.fact.right)] if prompt.fact else []
    if prompt.fact or long_texts:
        bank = FACT_EXTRAS if prompt.fact else HELPFUL_SENTENCES
        if long_texts:
            parts += _fill(rng, bank, rng.randint(200, 650), slots)
        else:
            parts += [sentence.format(**slots) for sentence in rng.sample(bank, n_sentences)]
        return " ".join(parts), phrasing
    # Task answers in many shapes: advice about the subject, concrete steps that never name it,
    # and sometimes the reason why (short direct answers and longer explanatory ones).
    n_about = sum(rng.random() < 0.4 for _ in range(n_sentences))
    parts += [sentence.format(**slots) for sentence in rng.sample(HELPFUL_SENTENCES, n_about)]
    parts += rng.sample(ADVICE_STEPS, n_sentences - n_about)
    rng.shuffle(parts)
    if n_sentences > 1 and rng.random() < 0.3:
        parts[-1] = _pick(rng, EXPLANATIONS)
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
    closer = [_pick(rng, RUDE_CLOSERS)] if not content or rng.random() < 0.35 else []
    return " ".join([_pick(rng, RUDE_OPENERS)] + ([content] if content else []) + closer)


def _make_pair(rng: random.Random, prompt: _Prompt, long_texts: bool) -> tuple[str, str, str]:
    """(good, flawed, flaw kind) for one prompt."""
    kinds = FLAW_KINDS if prompt.fact else tuple(k for k in FLAW_KINDS if k != "wrong_fact")
    weights = [4.0 if k == "wrong_fact" else 1.0 for k in kinds]  # fact prompts mostly test the fact
    flaw = rng.choices(kinds, weights)[0]
    # Good answers vary from one short sentence to several; waffle is always beaten by a short answer.
    fewest = 0 if prompt.fact else 1  # a fact answer is complete with the fact alone
    n_sentences = rng.randint(fewest, 1) if flaw == "waffle" else rng.randint(fewest, 4 - 2 * bool(prompt.fact))
    core, phrasing = _core_answer(rng, prompt, n_sentences, long_texts)
    if flaw == "rude":
        # Polite frames are optional and rude ones short, so tone (not length) tells them apart.
        polite = [_pick(rng, POLITE_OPENERS)] if rng.random() < 0.7 else []
        polite += [core] + ([_pick(rng, POLITE_CLOSERS)] if rng.random() < 0.75 else [])
        return " ".join(polite), _rude(rng, core, long_texts), flaw
    good = core if rng.random() < 0.6 else f"{_pick(rng, POLITE_OPENERS)} {core}"
    if flaw == "wrong_fact":
        assert prompt.fact is not None
        right, wrong = phrasing.format(prompt.fact.right), phrasing.format(prompt.fact.wrong)
        return good, good.replace(right, wrong, 1), flaw
    if flaw == "refusal":
        extra = rng.randint(150, 500) if long_texts else rng.choice((0, 0, 40, 80))
        reasons = _fill(rng, REFUSAL_REASONS, extra, {"s": prompt.subject}) if extra else []
        return good, " ".join([_pick(rng, REFUSALS)] + reasons), flaw
    if flaw == "waffle":
        target = max(len(good) + 120, rng.randint(220, 340) if not long_texts else rng.randint(500, 900))
        return good, " ".join(_fill(rng, WAFFLE_SENTENCES, target, {"s": prompt.subject})), flaw
    # off_topic: a fluent answer about something else entirely
    target = rng.randint(200, 650) if long_texts else rng.randint(20, 200)
    return good, " ".join(_fill(rng, OFF_TOPIC_SENTENCES, target, {})), flaw


def _prompt_key(delivered: Any) -> str:
    return delivered if isinstance(delivered, str) else orjson.dumps(delivered).decode()


def _generate_pairs(seed: int, n: int, long_texts: bool) -> pd.DataFrame:
    """`n` distinct comparisons: prompt (as delivered), good, bad, flaw. ~20% of pairs reuse a prompt."""
    rng = random.Random(seed)
    prompts: list[_Prompt] = []
    seen: set[tuple[str, str, str]] = set()
    rows: list[tuple[Any, str, str, str]] = []
    while len(rows) < n:
        if prompts and rng.random() < 0.2:
            prompt = prompts[rng.randrange(len(prompts))]
        else:
            prompt = _make_prompt(rng, long_texts)
            prompts.append(prompt)
        good, bad, flaw = _make_pair(rng, prompt, long_texts)
        key = (_prompt_key(prompt.delivered), good, bad)
        if key in seen:  # the same comparison twice would merge into one pair downstream
            continue
        seen.add(key)
        rows.append((prompt.delivered, good, bad, flaw))
    frame = pd.DataFrame({name: _objects(column) for name, column in zip(("prompt", "good", "bad", "flaw"), zip(*rows))})
    frame["strength"] = _objects(frame["flaw"].map(FLAW_STRENGTH))
    return frame


def _objects(values) -> pd.Series:
    """An object column: keeps references to shared strings (a `str` column would copy every row)."""
    return pd.Series(list(values) if not isinstance(values, (np.ndarray, pd.Series)) else values, dtype=object)


# ----------------------------------------------------------------------------------------------
# Votes
# ----------------------------------------------------------------------------------------------


def _draw_annotators(
    rng: np.random.Generator, n_pairs: int, votes_per_pair: Mapping[int, float]
) -> tuple[np.ndarray, np.ndarray]:
    """(pair index, annotator index) per vote: the dominant annotator plus k-1 distinct others per pair."""
    counts = rng.choice(list(votes_per_pair), p=list(votes_per_pair.values()), size=n_pairs)
    weights = np.array([a[3] for a in ANNOTATORS[1:]])
    # Weighted sampling without replacement, vectorized: top-k of log(weight) + Gumbel noise.
    keys = np.log(weights)[None, :] + rng.gumbel(size=(n_pairs, len(weights)))
    order = np.argsort(-keys, axis=1) + 1  # +1: index 0 is the dominant annotator
    picks = np.concatenate([np.zeros((n_pairs, 1), dtype=np.int64), order], axis=1)
    mask = np.arange(picks.shape[1])[None, :] < counts[:, None]
    pair_idx = np.broadcast_to(np.arange(n_pairs)[:, None], picks.shape)[mask]
    return pair_idx, picks[mask]


def _judge(rng: np.random.Generator, annotator: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """Per vote: 'right', 'wrong' or 'tie' relative to the ground truth."""
    kinds = np.array([a[1] for a in ANNOTATORS])[annotator]
    accuracy = np.array([a[2] for a in ANNOTATORS])[annotator]
    tie_rate = pd.Series(strength).map(TIE_RATE).to_numpy(float)
    wrong_rate = (1 - accuracy) * pd.Series(strength).map(ERROR_SCALE).to_numpy(float)
    u = rng.random(len(annotator))
    outcome = np.where(u < tie_rate, "tie", np.where(u < tie_rate + wrong_rate, "wrong", "right"))
    careless = kinds == "careless"
    outcome[careless] = rng.choice(["right", "wrong", "tie"], p=[0.45, 0.45, 0.1], size=careless.sum())
    return outcome


def _strength_labels(rng: np.random.Generator, strength: np.ndarray, annotator: np.ndarray, tie: np.ndarray):
    level = pd.Series(strength).map({s: i for i, s in enumerate(STRENGTHS)}).to_numpy()
    level = np.clip(level + rng.choice([-1, 0, 1], p=[0.15, 0.7, 0.15], size=len(level)), 0, 3)
    careless = np.array([a[1] != "good" for a in ANNOTATORS])[annotator]
    level[careless] = rng.integers(0, 4, size=careless.sum())
    labels = np.array(STRENGTHS, dtype=object)[level]
    labels[tie | (rng.random(len(level)) < MISSING_STRENGTH_RATE)] = None
    return labels


def generate_votes(cfg: Mapping[str, Any]) -> pd.DataFrame:
    """All vote rows for `cfg.n_pairs` comparisons, in memory.

    Columns: prompt, response_a, response_b, annotator_id, choice, strength, time_spent_s (the
    fields an annotation tool exports) plus the ground truth, never written to files:
    true_pair (comparison index), true_choice (where the good response is shown: "a"/"b"),
    true_flaw. Text columns are object dtype sharing one string per comparison, so 1M rows
    cost the memory of the distinct texts only.
    """
    conf = cfg if isinstance(cfg, SampleConfig) else SampleConfig.from_params(cfg)
    pairs = _generate_pairs(conf.seed, conf.n_pairs + conf.pair_rows, conf.long_texts).iloc[: conf.n_pairs]
    rng = np.random.default_rng(conf.seed)
    pair_idx, annotator = _draw_annotators(rng, len(pairs), conf.votes_per_pair)
    strength = pairs["strength"].to_numpy()[pair_idx]
    outcome = _judge(rng, annotator, strength)
    good_in_a = rng.random(len(pair_idx)) < 0.5  # A/B order drawn per vote
    good = pairs["good"].to_numpy()[pair_idx]
    bad = pairs["bad"].to_numpy()[pair_idx]
    true_choice = np.where(good_in_a, "a", "b")
    choice = np.where(outcome == "right", true_choice, np.where(good_in_a, "b", "a"))
    choice = np.where(outcome == "tie", "tie", choice)
    kinds = np.array([a[1] for a in ANNOTATORS])[annotator]
    choice = np.where(kinds == "always_a", "a", choice)
    fast = kinds != "good"
    return pd.DataFrame(
        {
            "prompt": _objects(pairs["prompt"].to_numpy()[pair_idx]),
            "response_a": _objects(np.where(good_in_a, good, bad)),
            "response_b": _objects(np.where(good_in_a, bad, good)),
            "annotator_id": _objects(np.array([a[0] for a in ANNOTATORS], dtype=object)[annotator]),
            "choice": _objects(choice.astype(object)),
            "strength": _objects(_strength_labels(rng, strength, annotator, choice == "tie")),
            "time_spent_s": np.where(fast, rng.integers(2, 9, len(fast)), rng.integers(15, 180, len(fast))),
            "true_pair": pair_idx,
            "true_choice": _objects(true_choice.astype(object)),
            "true_flaw": _objects(pairs["flaw"].to_numpy()[pair_idx]),
        }
    )


def generate_pair_rows(cfg: Mapping[str, Any]) -> pd.DataFrame:
    """`cfg.pair_rows` extra comparisons as already-judged pair rows (prompt, chosen, rejected,
    annotator_id, margin), each judged by two annotators; `true_pair`/`true_flaw` hold the truth."""
    conf = cfg if isinstance(cfg, SampleConfig) else SampleConfig.from_params(cfg)
    pairs = _generate_pairs(conf.seed, conf.n_pairs + conf.pair_rows, conf.long_texts).iloc[conf.n_pairs:]
    rng = np.random.default_rng(conf.seed + 1)
    rows = []
    for i, pair in enumerate(pairs.itertuples(index=False)):
        messages = pair.prompt if isinstance(pair.prompt, list) else [{"role": "user", "content": pair.prompt}]
        second = ANNOTATORS[1 + rng.integers(0, 9)][0]  # a good annotator other than the dominant one
        for annotator in (DOMINANT_ANNOTATOR, second):
            agrees = rng.random() < 0.95
            chosen, rejected = (pair.good, pair.bad) if agrees else (pair.bad, pair.good)
            margin = None if rng.random() < 0.5 else float(STRENGTHS.index(pair.strength)) / 3
            rows.append((messages, chosen, rejected, annotator, margin, conf.n_pairs + i, pair.flaw))
    return pd.DataFrame(
        rows, columns=["prompt", "chosen", "rejected", "annotator_id", "margin", "true_pair", "true_flaw"]
    )


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

DATA_SUFFIXES = (".jsonl", ".csv", ".parquet")


def _public(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[c for c in frame.columns if not c.startswith("true_")]]


def _write_jsonl(path: Path, frame: pd.DataFrame) -> None:
    columns = list(frame.columns)
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        for values in zip(*(frame[c].to_numpy() for c in columns)):
            row = {c: v.item() if isinstance(v, np.generic) else v for c, v in zip(columns, values) if v is not None}
            fh.write(orjson.dumps(row) + b"\n")


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    """One vote per record; chat prompts as a JSON string in the cell (as spreadsheet exports do)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(frame.columns)
        for values in zip(*(frame[c].to_numpy() for c in frame.columns)):
            writer.writerow(
                orjson.dumps(v).decode() if isinstance(v, list) else ("" if v is None else v) for v in values
            )


def _write_pair_parquet(path: Path, frame: pd.DataFrame) -> None:
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("prompt", pa.list_(message)), ("chosen", pa.string()), ("rejected", pa.string()),
                        ("annotator_id", pa.string()), ("margin", pa.float64())])
    table = pa.Table.from_pydict({c: frame[c].tolist() for c in schema.names}, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_sample_batches(out_dir: str | Path, cfg: Mapping[str, Any]) -> list[Path]:
    """Write the sample batches into `out_dir` and return their paths.

    `n_batches` vote-row files (batch-0001.jsonl, batch-0002.csv, ... alternating) holding the
    votes in shuffled order, plus batch-NNNN-pairs.parquet with the pair rows (if pair_rows > 0).
    Refuses to write beside other batch files, which would be collected together with these.
    """
    conf = SampleConfig.from_params(cfg)
    out_dir = Path(out_dir)
    names = [f"batch-{i + 1:04d}{'.jsonl' if i % 2 == 0 else '.csv'}" for i in range(conf.n_batches)]
    if conf.pair_rows:
        names.append(f"batch-{conf.n_batches + 1:04d}-pairs.parquet")
    if out_dir.is_dir():
        others = sorted(
            p.name for p in out_dir.iterdir() if not p.name.startswith(".") and p.name not in names
            and (p.suffix in DATA_SUFFIXES or (p.is_dir() and folder_kind(p)))  # a dataset folder is a batch too
        )
        if others:
            raise UserError(
                f"{out_dir} already holds other batch files ({', '.join(others[:5])}); they would be collected "
                "together with the samples: remove them or write into an empty folder (--out)"
            )
    votes = _public(generate_votes(conf))
    shuffled = votes.iloc[np.random.default_rng(conf.seed + 2).permutation(len(votes))]
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(len(shuffled)), conf.n_batches)):
        path = out_dir / names[i]
        (_write_jsonl if path.suffix == ".jsonl" else _write_csv)(path, shuffled.iloc[chunk])
        paths.append(path)
    if conf.pair_rows:
        path = out_dir / names[-1]
        _write_pair_parquet(path, _public(generate_pair_rows(conf)))
        paths.append(path)
    return paths
