"""General held-out exchanges for checking an exported or quantised model against the model it came from.

None of the project's training data contains them. The answers are a few sentences long so that ~20 rows give about
a thousand answer tokens: enough for a top-1 agreement and an eval-loss ratio to mean something (a few probes of
two dozen tokens moved by ±1 % on one near-tie), still a few seconds' forward pass for a 135M model on 2 cores.
"""

from __future__ import annotations

_EXCHANGES = (
    ("Why is the sky blue?",
     "Sunlight is made of many colours. As it passes through the air, the short blue waves are scattered by the gas "
     "molecules far more than the long red ones, so blue light reaches our eyes from every part of the sky."),
    ("How do plants make their food?",
     "Plants use photosynthesis. Their leaves take in carbon dioxide from the air and water from the roots, and the "
     "green pigment chlorophyll uses the energy of sunlight to turn them into sugar, releasing oxygen as a by-product."),
    ("What should I pack for a day of hiking?",
     "Bring plenty of water, a snack or two, a map of the trail, sunscreen and a hat. A light rain jacket and a small "
     "first-aid kit are worth the weight, and good shoes matter more than anything else."),
    ("Can you explain what a prime number is?",
     "A prime number is a whole number greater than one that can only be divided evenly by one and by itself. For "
     "example, 2, 3, 5, 7 and 11 are prime, while 9 is not, because it is three times three."),
    ("How can I get better at remembering names?",
     "Repeat the name out loud as soon as you hear it, and use it once or twice in the conversation. Linking it to "
     "something about the person, such as where you met them, also helps the name stick."),
    ("What causes the seasons on Earth?",
     "The seasons come from the tilt of the Earth's axis. As the planet travels around the Sun, each half is tilted "
     "towards it for part of the year, getting longer days and more direct sunlight, which makes summer."),
    ("Give me a simple recipe for pancakes.",
     "Mix one cup of flour, one tablespoon of sugar, two teaspoons of baking powder and a pinch of salt. Whisk in one "
     "egg and a cup of milk, then cook spoonfuls of the batter in a hot, lightly oiled pan until bubbles appear, and "
     "flip them once."),
    ("Why do cats purr?",
     "Cats often purr when they are relaxed and content, but they also purr when they are frightened or hurt. Many "
     "scientists think purring calms them and may even help their bones and muscles heal."),
    ("What is the difference between weather and climate?",
     "Weather is what the air is doing right now or over a few days: rain, wind, sunshine. Climate is the pattern of "
     "weather in a place averaged over many years, such as a region having hot, dry summers."),
    ("How does a bicycle stay upright?",
     "A moving bicycle stays up mostly because the rider keeps steering the front wheel under the falling side. The "
     "shape of the fork and the spinning wheels help it steer itself, which is why riding slowly is harder."),
    ("Write a short poem about the moon.",
     "Silver lantern, quiet friend,\nyou follow us until the end\nof every road we walk at night,\nand lend the "
     "sleeping fields your light."),
    ("What are some tips for a job interview?",
     "Learn about the company beforehand and prepare a few examples of your past work. Arrive a little early, listen "
     "carefully to each question, and have one or two questions of your own ready for the end."),
    ("How many hours are there in a week?",
     "There are twenty-four hours in a day and seven days in a week, so a week has 24 times 7, which is 168 hours."),
    ("Why do we have leap years?",
     "The Earth takes about 365 and a quarter days to go around the Sun. Adding one extra day to February every four "
     "years keeps the calendar in step with the seasons."),
    ("What is a good way to start learning to cook?",
     "Begin with a handful of simple dishes you enjoy eating, such as an omelette, a pasta sauce and a soup. Cook "
     "each of them several times, taste as you go, and only then move on to new recipes."),
    ("Explain how a rainbow forms.",
     "A rainbow appears when sunlight shines through raindrops in front of you while the Sun is behind you. Each drop "
     "bends the light, splits it into its colours and reflects it back, and we see the colours as a bright arc."),
    ("What does a library offer besides books?",
     "Most libraries lend films, music and audiobooks, and many have free internet access, quiet study rooms and "
     "printers. They also run events such as reading groups, language classes and story time for children."),
    ("How do vaccines work?",
     "A vaccine shows the immune system a harmless piece or a weakened form of a germ. The body learns to recognise "
     "it and makes antibodies, so if the real germ arrives later, the defence is ready much faster."),
    ("Suggest three names for a friendly robot.",
     "How about Bolt, a short and cheerful name; Pixel, for a robot that loves screens and lights; or Juniper, which "
     "sounds warm and a little unexpected for a machine."),
    ("What is the water cycle?",
     "Water evaporates from seas, lakes and plants, rises as vapour and cools into clouds. It falls back as rain or "
     "snow, runs into rivers and the ground, and eventually returns to the sea, where the cycle starts again."),
)

CHECK_ROWS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    for question, answer in _EXCHANGES
]


def with_system_prompt(rows: list[list[dict[str, str]]], system_prompt: str | None) -> list[list[dict[str, str]]]:
    """`rows` as the agent sees them: its system prompt first, when it has one."""
    if not system_prompt:
        return rows
    return [[{"role": "system", "content": system_prompt}, *row] for row in rows]
