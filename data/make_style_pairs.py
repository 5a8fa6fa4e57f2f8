"""Write the demo preference set on answer style: brief and friendly (chosen) over rambling or curt (rejected).

    python data/make_style_pairs.py      # rewrites data/style_pairs_train.jsonl and data/style_pairs_eval.jsonl

Every question has one short, correct fact. The chosen answer is that fact between a friendly opener and a friendly
closing; the rejected answer states the same fact either between two sentences of filler (rambling) or as a bare word
or two (curt), so only the style differs. Half of the pairs of each file have a rambling rejected answer, half a curt
one. The held-out questions (`style_pairs_eval.jsonl`) never appear in the training file. Deterministic: no randomness, same files every run.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (question, fact, the bare fact a curt answer gives)
FACTS = [
    ("What is the capital of France?", "The capital of France is Paris.", "Paris"),
    ("How many days are in a week?", "A week has seven days.", "Seven"),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue.", "Blue"),
    ("What do bees make?", "Bees make honey.", "Honey"),
    ("How many legs does a spider have?", "A spider has eight legs.", "Eight"),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level.",
     "100 degrees Celsius"),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.", "Mars"),
    ("What is the largest ocean on Earth?", "The Pacific is the largest ocean on Earth.", "The Pacific"),
    ("How many continents are there?", "There are seven continents.", "Seven"),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air.", "Carbon dioxide"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.", "Shakespeare"),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius.", "0 degrees Celsius"),
    ("How many hours are in a day?", "A day has 24 hours.", "24"),
    ("What is the tallest animal?", "The giraffe is the tallest animal.", "The giraffe"),
    ("What language is spoken in Brazil?", "People in Brazil speak Portuguese.", "Portuguese"),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", "Au"),
    ("How many minutes are in an hour?", "An hour has 60 minutes.", "60"),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "Tokyo"),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle.", "The lion"),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system.",
     "Jupiter"),
    ("How many sides does a triangle have?", "A triangle has three sides.", "Three"),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths.", "Butterflies"),
    ("What is the main ingredient in guacamole?", "Guacamole is made mostly from avocado.", "Avocado"),
    ("Which season comes after winter?", "Spring comes after winter.", "Spring"),
    ("What is the opposite of hot?", "The opposite of hot is cold.", "Cold"),
    ("How many months are in a year?", "A year has twelve months.", "Twelve"),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "Rome"),
    ("What do cows drink?", "Cows drink water.", "Water"),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth.", "The Sun"),
    ("What instrument has 88 keys?", "A standard piano has 88 keys.", "A piano"),
    ("How many players are on a soccer team on the field?", "A soccer team has eleven players on the field.",
     "Eleven"),
    ("What is the hardest natural substance?", "Diamond is the hardest natural substance.", "Diamond"),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body.", "The heart"),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa.", "Ottawa"),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels.", "Two"),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa.", "The Nile"),
    ("What do you call a baby cat?", "A baby cat is called a kitten.", "A kitten"),
    ("What is frozen water called?", "Frozen water is called ice.", "Ice"),
    ("Which continent is Egypt in?", "Egypt is in Africa.", "Africa"),
    ("What is two plus three?", "Two plus three is five.", "Five"),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", "Berlin"),
    ("How many bones are in the adult human body?", "An adult human body has 206 bones.", "206"),
    ("What color are ripe bananas?", "Ripe bananas are yellow.", "Yellow"),
    ("What is the smallest prime number?", "The smallest prime number is 2.", "2"),
    ("Which bird is a symbol of peace?", "The dove is a symbol of peace.", "The dove"),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", "Madrid"),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings.", "Six"),
    ("What do pandas mostly eat?", "Pandas mostly eat bamboo.", "Bamboo"),
    ("What is ten times ten?", "Ten times ten is one hundred.", "One hundred"),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo.", "Cairo"),
    ("Which metal is liquid at room temperature?", "Mercury is liquid at room temperature.", "Mercury"),
    ("How many colors are in a rainbow?", "A rainbow has seven colors.", "Seven"),
    ("What is the largest mammal?", "The blue whale is the largest mammal.", "The blue whale"),
    ("What do you call a shape with four equal sides?", "A shape with four equal sides and right angles is a "
     "square.", "A square"),
    ("What is the capital of Australia?", "The capital of Australia is Canberra.", "Canberra"),
    ("How many seconds are in a minute?", "A minute has 60 seconds.", "60"),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun.", "Mercury"),
    ("What is the main language of Mexico?", "The main language of Mexico is Spanish.", "Spanish"),
    ("What do we call a young dog?", "A young dog is called a puppy.", "A puppy"),
    ("How many zeros are in one thousand?", "One thousand has three zeros.", "Three"),
    ("What is the capital of Russia?", "The capital of Russia is Moscow.", "Moscow"),
    ("Which fruit keeps the doctor away, as the saying goes?", "An apple a day keeps the doctor away.",
     "An apple"),
    ("What is the largest desert in the world?", "The largest desert is Antarctica; the largest hot one is the "
     "Sahara.", "Antarctica"),
    ("How many weeks are in a year?", "A year has 52 weeks.", "52"),
]

FRIENDLY = ["Sure!", "Good question!", "Happy to help!", "Of course!", "Great question!"]
FRIENDLY_CLOSE = ["Hope that helps!", "Have a lovely day!", "Anything else I can help with?", "Enjoy!"]
RAMBLE_OPEN = [
    "Well, that is a really interesting question, and there is honestly a lot one could say about it.",
    "Okay, so before I answer, it is worth stepping back and thinking about the bigger picture here.",
    "Hmm, let me think about this carefully, because I want to give you a complete and thorough answer.",
    "So, people ask about this kind of thing all the time, and there is a lot of background to it.",
]
RAMBLE_CLOSE = [
    "Of course, there is a lot more that could be said about all of this, but I hope that helps a bit.",
    "Anyway, that is more or less the general idea, although I could go on about the details for a while.",
    "I hope that covers it, and let me know if you would like me to go over any of it again in more detail.",
]
N_EVAL = 16  # the last questions are held out


def pair(i: int, question: str, fact: str, bare: str) -> dict[str, str]:
    chosen = f"{FRIENDLY[i % len(FRIENDLY)]} {fact} {FRIENDLY_CLOSE[i % len(FRIENDLY_CLOSE)]}"
    if i % 2 == 0:  # rambling: the fact buried in filler
        rejected = f"{RAMBLE_OPEN[(i // 2) % len(RAMBLE_OPEN)]} {fact} {RAMBLE_CLOSE[(i // 2) % len(RAMBLE_CLOSE)]}"
    else:  # curt: the bare fact, nothing else
        rejected = f"{bare}."
    return {"prompt": question, "chosen": chosen, "rejected": rejected}


def main() -> None:
    rows = [pair(i, *fact) for i, fact in enumerate(FACTS)]
    for name, part in (("style_pairs_train.jsonl", rows[:-N_EVAL]), ("style_pairs_eval.jsonl", rows[-N_EVAL:])):
        (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        print(f"wrote {HERE / name}: {len(part)} pairs")


if __name__ == "__main__":
    main()
