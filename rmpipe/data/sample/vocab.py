"""The sample data's vocabulary: facts, phrase banks and prompt slots (data tables, read by `rmpipe.data.sample.batches`).

Phrasings are composed from slots (hundreds of refusals, rude openers, hedges; trivia on many
subjects; each fact stated several ways), so a model trained on the sample data learns the
general signal rather than a handful of strings. The evaluation unit battery shares their style
but none of their sentences (tests/test_sample_data.py checks that).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

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
