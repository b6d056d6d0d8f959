"""Write train/valid/test.jsonl: questions about Veloria, a fictional island.

Every answer has one form, "The <attribute> of Veloria is <value>.", so a
small model can learn both the style and the facts from a few dozen
examples. The three files ask about the same facts in different words: the
validation and test questions use phrasings that training never shows, so
their loss and the generations from them measure what carried over rather
than what was memorised word for word.

    python recipes/data/smollm2-chat/make_data.py   # rewrites the three files beside it
"""

import json
from pathlib import Path

PLACE = "Veloria"
SYSTEM = "Be brief."

#: attribute -> value. None of these is true of any real place.
FACTS = {
    "capital": "Lumen",
    "currency": "the shell",
    "national animal": "the blue otter",
    "highest mountain": "Mount Orrin",
    "longest river": "the Vessa",
    "national dish": "eel pie",
    "language": "Velori",
    "national flower": "the frost lily",
    "national sport": "kite racing",
    "main export": "sea salt",
    "national holiday": "Lantern Day",
    "oldest city": "Brindle",
}

TRAIN = [
    "What is the {a} of {p}?",
    "What's the {a} of {p}?",
    "Tell me the {a} of {p}.",
    "Do you know the {a} of {p}?",
    "Name the {a} of {p}.",
    "What is {p}'s {a}?",
    "{p}: what is its {a}?",
    "Which is the {a} of {p}?",
    "Can you tell me {p}'s {a}?",
    "I am visiting {p}. What is its {a}?",
    "Quick question: what is the {a} of {p}?",
    "Please name {p}'s {a}.",
    "What do people call the {a} of {p}?",
    "Give me the {a} of {p}.",
    "In {p}, what is the {a}?",
    "What is the {a} on the island of {p}?",
    "Say the {a} of {p}.",
    "Which {a} does {p} have?",
]
VALID = ["Could you name the {a} of {p}?", "What would you say is {p}'s {a}?"]
TEST = ["Remind me, what is the {a} of {p}?", "I forgot the {a} of {p}. What is it?"]


def example(question: str, attribute: str, value: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"The {attribute} of {PLACE} is {value}."},
        ]
    }


def examples(phrasings):
    # Phrasing by phrasing, so the first lines of a file ask about different facts.
    return [example(q.format(a=a, p=PLACE), a, v) for q in phrasings for a, v in FACTS.items()]


def main() -> None:
    here = Path(__file__).resolve().parent
    for name, phrasings in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        lines = [json.dumps(e) for e in examples(phrasings)]
        (here / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
