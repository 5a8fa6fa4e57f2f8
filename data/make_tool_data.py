"""Write the calculator demo data: arithmetic questions answered through a `calculator` tool call, in varied
phrasings, plus held-out questions phrased unlike any training row. Deterministic (seeded); rerun after editing.

    python data/make_tool_data.py

Writes data/ember_tools_train.jsonl (tool rows), data/ember_agent_train.jsonl (the start-up demo: the identity rows
of ember_train.jsonl plus the tool rows), data/ember_agent_eval.jsonl, data/ember_tool_probes.json (the held-out
probes: arithmetic, plain and identity questions) and data/ember_tool_dev_probes.json (the dev phrasings and the two
earlier held-out sets).
The tool schema is the one the chat's Toolkit sends for `chat_tools.calculator`, so training sees exactly the
tools the chat offers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from chat.tools import calculator, make_toolkit  # noqa: E402

# Each operation's usual English words (the keyword lists of school word problems) in plain, terse, polite,
# equation-style and word-problem sentences.
TRAIN_QUESTIONS = [
    ("What is {a} times {b}?", "*"), ("What's {a} multiplied by {b}?", "*"), ("Compute {a} * {b}.", "*"),
    ("How much is {a} x {b}?", "*"), ("calculate {a}*{b}", "*"), ("What is the product of {a} and {b}?", "*"),
    ("Can you multiply {a} and {b}?", "*"), ("{a} times {b} = ?", "*"),
    ("I'd like to know what {a} times {b} comes to.", "*"),
    ("If one box holds {b} items, how many items are in {a} boxes?", "*"), ("Find the product {a} × {b}.", "*"),
    ("Multiply {a} with {b}.", "*"), ("What's {a} lots of {b}?", "*"),
    ("A ticket costs {b} dollars. How much do {a} tickets cost?", "*"), ("{a} rows of {b} seats: how many seats?", "*"),
    ("What is {a} plus {b}?", "+"), ("Add {a} and {b}.", "+"), ("How much is {a} + {b}?", "+"),
    ("What's the sum of {a} and {b}?", "+"), ("Can you add {a} to {b}?", "+"), ("{a} + {b} = ?", "+"),
    ("What do {a} and {b} add up to?", "+"), ("I have {a} stamps and get {b} more. How many do I have now?", "+"),
    ("hey whats {a} plus {b}", "+"), ("What is {a} increased by {b}?", "+"), ("Find the total of {a} and {b}.", "+"),
    ("What number is {b} more than {a}?", "+"), ("Combine {a} and {b}. What's the total?", "+"),
    ("Add {b} onto {a}.", "+"), ("Sum {a} and {b}.", "+"),
    ("What is {a} minus {b}?", "-"), ("Subtract {b} from {a}.", "-"), ("How much is {a} - {b}?", "-"),
    ("Can you subtract {b} from {a}?", "-"), ("{a} - {b} = ?", "-"),
    ("I had {a} dollars and spent {b}. How much is left?", "-"), ("What's {a} less {b}?", "-"),
    ("How much bigger is {a} than {b}?", "-"), ("Count down {b} from {a}: where do I land?", "-"),
    ("What's the difference between {a} and {b}?", "-"), ("What is {a} reduced by {b}?", "-"),
    ("What is {a} take away {b}?", "-"), ("Deduct {b} from {a}.", "-"),
    ("A book has {a} pages and I've read {b}. How many pages are still unread?", "-"),
    ("How many fewer is {b} than {a}?", "-"),
    ("What is {a} divided by {b}?", "/"), ("Divide {a} by {b}, please.", "/"), ("What's {a} / {b}?", "/"),
    ("Can you divide {a} by {b}?", "/"), ("{a} / {b} = ?", "/"),
    ("{a} cookies are shared equally among {b} kids. How many does each get?", "/"),
    ("How many times does {b} go into {a}?", "/"), ("How many groups of {b} are in {a}?", "/"),
    ("What's {a} over {b}?", "/"), ("What's the quotient when {a} is divided by {b}?", "/"), ("Find {a} ÷ {b}.", "/"),
    ("Split {a} evenly into {b} groups.", "/"), ("{a} ÷ {b} = ?", "/"),
    ("If a trip of {a} km takes {b} hours, how many km is that per hour?", "/"),
    ("{b} friends pay a {a} dollar bill equally. How much does each pay?", "/"),
]
# More phrasings, written blind (by someone who saw neither the held-out probes nor any result), with everyday story
# problems in many situations and operand orders ("{b} ... from {a}"); the few that shared three words in a row with a
# held-out phrasing were dropped. On the dev probes (3 seeds) they raised the right calls from 35.0 to 39.3 of 44.
MORE_QUESTIONS = [
    ("Each of the {a} students in the class brought {b} pencils. How many pencils did they bring altogether?", "*"),
    ("A gardener plants {a} flower beds with {b} bulbs in each bed. How many bulbs does she need?", "*"),
    ("My dog eats {b} treats a day. How many treats does he get through in {a} days?", "*"),
    ("A shuttle bus makes {a} trips a day and carries {b} passengers per trip. How many passengers is that daily?", "*"),
    ("Packs of {b} batteries were on sale and I grabbed {a} packs. How many batteries did I buy?", "*"),
    ("multiply {b} by {a} for me real quick", "*"),
    ("Help me calculate {a} groups of {b}.", "*"),
    ("I need the answer to {a} times {b} for my homework.", "*"),
    ("What does {a} come to when you multiply it by {b}?", "*"),
    ("A bus had {a} passengers and {b} more got on at the next stop. How many are on the bus now?", "+"),
    ("Maria earned {a} dollars on Saturday and {b} dollars on Sunday. What were her total earnings?", "+"),
    ("We had {a} jars of jam in the pantry and bought {b} more at the market. How many jars do we have?", "+"),
    ("The recipe needs {b} grams of sugar for the cake and {a} grams for the icing. How much sugar altogether?", "+"),
    ("pls tally {a} with {b} real quick", "+"),
    ("Would you kindly say what {a} and {b} come to altogether?", "+"),
    ("Grand total for {a} plus {b}?", "+"),
    ("help me add these two numbers: {a} and {b}", "+"),
    ("Total up {b} with {a}, please.", "+"),
    ("There were {a} cupcakes on the tray and the kids ate {b}. How many cupcakes are left?", "-"),
    ("A farmer had {a} eggs, but {b} broke on the way to market. How many eggs are still whole?", "-"),
    ("{b} passengers got off the train at the first stop. If there were {a} aboard, how many stayed on?", "-"),
    ("The snowman started with {a} grams of snow and {b} grams melted by noon. How many grams remain?", "-"),
    ("I gave away {b} of my {a} comic books. How many comic books do I still own?", "-"),
    ("A shop had {a} umbrellas in stock and sold {b} during the storm. How many are in stock now?", "-"),
    ("Our printer had {a} sheets of paper and we used up {b}. How many sheets are still there?", "-"),
    ("Help me take {b} away from {a}.", "-"),
    ("Subtraction please: {b} taken off {a}.", "-"),
    ("Please compute {a} with {b} subtracted.", "-"),
    ("{b} friends share {a} sweets equally. How many sweets does each friend get?", "/"),
    ("A baker packs {a} muffins into boxes of {b} each. How many boxes does she fill?", "/"),
    ("I have {b} days to read a {a} page book. How many pages per day is that?", "/"),
    ("A {a} cm ribbon is cut into pieces of {b} cm each. How many pieces are there?", "/"),
    ("Divide {b} into {a}.", "/"),
    ("I need the per-person amount when {a} is spread across {b} people.", "/"),
    ("Help me work out {b} equal shares of {a}.", "/"),
    ("If {a} is the dividend and {b} is the divisor, what's the quotient?", "/"),
]
TRAIN_REPEATS = 2  # each phrasing with 2 different pairs of numbers
DEV_QUESTIONS = [  # phrasings for the eval loss only (choosing steps and learning rate)
    ("Tell me what {a} times {b} is.", "*"), ("Figure out {a} * {b} please.", "*"),
    ("Put {a} and {b} together, how many?", "+"), ("What's {a} added to {b}?", "+"),
    ("What remains when {b} is taken from {a}?", "-"), ("Knock {b} off {a}.", "-"),
    ("Split {a} into groups of {b}. How many groups?", "/"), ("{a} shared between {b} people is how much each?", "/"),
]
DEV_PROBE_QUESTIONS = [  # the first held-out set, now dev probes only: its results were looked at over 8 runs, so it
    # no longer measures phrasings nobody tuned for
    ("I need the result of {a} multiplied by {b}.", "*"), ("Help me figure out {a} times {b}.", "*"),
    ("There are {a} rows with {b} chairs in each row. How many chairs is that?", "*"),
    ("{a} multiplied by {b}, please.", "*"), ("Do the math: {a} x {b}.", "*"),
    ("What's {a} and {b} together?", "+"), ("Add up {a} and {b} for me.", "+"),
    ("A shop sold {a} apples in the morning and {b} in the afternoon. How many apples did it sell?", "+"),
    ("Increase {a} by {b}. What do you get?", "+"), ("What's the total when you add {b} to {a}?", "+"),
    ("Take {b} from {a}.", "-"), ("What's left if you remove {b} from {a}?", "-"),
    ("A tank holds {a} litres and {b} litres leak out. How much water remains?", "-"), ("Decrease {a} by {b}.", "-"),
    ("What do you get when {b} is subtracted from {a}?", "-"),
    ("How much is {a} split evenly {b} ways?", "/"), ("What does {a} divided by {b} come out to?", "/"),
    ("{a} over {b}: what's that?", "/"),
    ("A rope {a} metres long is cut into {b} equal pieces. How long is each piece?", "/"),
    ("Give me the quotient of {a} and {b}.", "/"),
]
SECOND_DEV_PROBE_QUESTIONS = [  # the second held-out set, dev probes since its results were looked at 3 times
    ("I'm buying {a} boxes of pens and each box holds {b} pens. How many pens will I have in total?", "*"),
    ("Every row in our school auditorium has {b} seats, and the auditorium has {a} rows. How many people can it seat?", "*"),
    ("yo what do i get if i multiply {a} by {b}", "*"),
    ("Would you mind multiplying {a} by {b} for me?", "*"),
    ("Scale {b} up by a factor of {a} and tell me the result.", "*"),
    ("I walked {a} meters to the store and then another {b} meters to the park. How far did I walk in total?", "+"),
    ("Our school library got {b} new books this month, and it already had {a}. How many books does it have now?", "+"),
    ("running tally says {a}, and i've got {b} to tack on, what's the new number", "+"),
    ("I'd appreciate it if you could tell me the sum of {b} and {a}.", "+"),
    ("What number do you reach if you go {b} past {a}?", "+"),
    ("This morning my wallet had ${a} in it, and groceries cost me ${b}. What's still in there?", "-"),
    ("A farmer picked {a} apples, but {b} of them were bruised and had to be thrown away. How many good apples are left?", "-"),
    ("if i start with {a} and lose {b}, what am i left with", "-"),
    ("Could you help me with {a} minus {b}? Thanks!", "-"),
    ("By how much does {a} exceed {b}?", "-"),
    ("Our road trip is {a} miles and we're splitting it evenly over {b} days. How many miles do we drive each day?", "/"),
    ("Each carton holds {b} eggs and I've got {a} eggs to pack. How many cartons will I fill?", "/"),
    ("hey so if i chop {a} into {b} equal parts how big is each one", "/"),
    ("Could you please tell me the result of dividing {a} by {b}?", "/"),
    ("Ratio of {a} to {b}?", "/"),
]
HELD_OUT_QUESTIONS = [  # the probes: phrasings unlike any training or dev one, written blind (by people who saw no
    # training data or results; overlapping ones were rewritten, blind, against a checker) and committed before any
    # training run that could be chosen on them
    ("A store sells notebooks for ${b} each. If a school orders {a} notebooks, how much does the order cost in total?", "*"),
    ("Each batch of cookies uses {b} grams of butter. How many grams of butter do I need to bake {a} batches?", "*"),
    ("A bus drives at a steady {b} miles per hour for {a} hours. How many miles does it cover?", "*"),
    ("yo quick one, {a} boxes w/ {b} cans in each, how many cans is that", "*"),
    ("ok so i work {b} hrs a week for {a} weeks... how many hours total lol", "*"),
    ("A rectangular room is {a} cm long and {b} cm wide. What is its area in square centimeters?", "*"),
    ("At the bowling alley, {a} lanes were each rented by a group of {b} players. How many bowlers were there altogether?", "*"),
    ("yo whats {a} times {b}", "*"),
    ("Whenever you get a moment, I'm curious what {a} groups containing {b} apiece come to.", "*"),
    ("Pray, what doth the multiplication of {a} with {b} yield?", "*"),
    ("I spent ${a} on a jacket and ${b} on shoes. How much did I spend altogether?", "+"),
    ("Our team scored {a} points in the first half and {b} points in the second half. What was our total score?", "+"),
    ("A school has {a} girls and {b} boys enrolled. How many students are there in all?", "+"),
    ("{a} + {b} = ?", "+"),
    ("A fisherman hooked {a} trout before lunch and another {b} after lunch. How many fish did he land altogether that day?", "+"),
    ("our choir had {a} sopranos then {b} altos joined, total singers?", "+"),
    ("The stadium sold {a} tickets on Friday and {b} on Saturday. What was the combined ticket count for both days?", "+"),
    ("hey quick one, {a} plus {b}??", "+"),
    ("If it's no trouble, could you sum up {a} together with {b}?", "+"),
    ("Kindly aggregate {a} and {b} into a single tally.", "+"),
    ("I had ${a} in my wallet and spent ${b} on groceries. How much money do I have left?", "-"),
    ("A hiking trail is {a} meters long. After walking {b} meters, how many meters remain?", "-"),
    ("A warehouse held {a} crates. After shipping out {b} crates, how many crates are still in the warehouse?", "-"),
    ("got {a} unread emails, deleted {b}, how many still left ugh", "-"),
    ("A campsite had {a} tents pitched, and {b} were packed up at dawn. How many tents remain standing?", "-"),
    ("A train pulled out carrying {a} commuters; {b} of them hopped off at the next platform. How many stayed aboard?", "-"),
    ("{a} minus {b}?? need it fast lol", "-"),
    ("Would it be possible to work out what's left once {b} is removed from {a}?", "-"),
    ("The cinema screened a film to {a} viewers, and {b} walked out early. How many watched until the credits rolled?", "-"),
    ("Pray subtract {b} out of {a} and declare what residue survives.", "-"),
    ("I have {a} grams of flour and each loaf of bread needs {b} grams. How many loaves can I make?", "/"),
    ("A car traveled {a} miles in {b} hours at a constant speed. What was its speed in miles per hour?", "/"),
    ("split {a} bucks between {b} ppl, how much each??", "/"),
    ("A gardener has {a} seedlings to plant in {b} equal rows. How many seedlings go in each row?", "/"),
    ("A coach splits {a} tennis balls evenly among {b} baskets. How many balls go in each basket?", "/"),
    ("Our office ordered {a} sandwiches for {b} teams, shared equally. How many sandwiches does each team get?", "/"),
    ("{a} split {b} ways = ?? pls", "/"),
    ("Would you mind telling me how many times {b} fits into {a}?", "/"),
    ("A builder has {a} bricks to lay in {b} equal stacks. How many bricks end up in each stack?", "/"),
    ("What quotient results from apportioning {a} equally across {b} portions?", "/"),
]
PRACTICE_QUESTIONS = [  # /practice demo tasks (data/ember_practice.jsonl): story problems answered by their number;
    # no four words in a row shared with any training, dev or held-out phrasing (checked in main)
    ("A florist ties {b} roses into every bouquet and makes {a} bouquets. How many roses does she use?", "*"),
    ("Our orchard has {a} trees, and each tree gave {b} pears this autumn. How many pears were picked?", "*"),
    ("A printer prints {b} pages per minute. How many pages come out after {a} minutes?", "*"),
    ("Every crate on the truck carries {b} melons, and the truck is loaded with {a} crates. Count the melons.", "*"),
    ("A marching band lines up in {a} ranks with {b} musicians per rank. How big is the band?", "*"),
    ("Tickets for the concert are {b} euros each and my club bought {a} of them. What did the club pay?", "*"),
    ("A spider web has {b} threads on each of its {a} spokes. How many threads does it have?", "*"),
    ("The factory fills {a} bottles every hour for {b} hours straight. How many bottles does it fill?", "*"),
    ("Each shelf in the archive stores {b} folders and there are {a} shelves. How many folders fit?", "*"),
    ("A cyclist rides {b} laps of a {a} metre track. How many metres does the cyclist ride?", "*"),
    ("The museum welcomed {a} visitors on Monday and {b} on Tuesday. How many visitors came over both days?", "+"),
    ("A baker made {a} rolls at dawn and {b} more at noon. How many rolls did the baker make?", "+"),
    ("My piggy bank holds {a} coins and grandma adds {b} coins. How many coins are in it now?", "+"),
    ("The library lent out {a} novels in spring and {b} in summer. How many novels were lent out?", "+"),
    ("A hiker climbs {a} metres before lunch and {b} metres after lunch. How far up does she climb?", "+"),
    ("An aquarium keeps {a} goldfish in one tank and {b} guppies in another. How many fish does it keep?", "+"),
    ("The zoo counted {a} adult penguins and {b} chicks. What is the size of the colony?", "+"),
    ("A farm stand sold {a} pumpkins last week and {b} this week. How many pumpkins has it sold?", "+"),
    ("Our village planted {a} oaks and {b} birches along the river. How many new trees line the river?", "+"),
    ("A courier delivered {a} parcels yesterday and {b} today. How many parcels were delivered?", "+"),
    ("A lake held {a} swans until {b} of them flew south. How many swans stayed on the lake?", "-"),
    ("The theatre has {a} seats and {b} are already booked. How many seats can still be booked?", "-"),
    ("A beekeeper collected {a} grams of honey and sold {b} grams at the fair. How much honey does he keep?", "-"),
    ("My phone had {a} photos before I deleted {b} blurry ones. How many photos are on it now?", "-"),
    ("A parking garage has room for {a} cars and {b} spots are taken. How many spots are free?", "-"),
    ("The marathon started with {a} runners and {b} dropped out. How many runners reached the finish?", "-"),
    ("A candle was {a} millimetres tall and burned down by {b} millimetres. How tall is the candle now?", "-"),
    ("The pond had {a} lily pads before the frogs sank {b} of them. How many lily pads still float?", "-"),
    ("A library owned {a} maps and lost {b} in the flood. How many maps survived?", "-"),
    ("An orchard grew {a} plums, and the birds pecked {b} of them. How many plums are unpecked?", "-"),
    ("A teacher hands out {a} stickers so that each of {b} pupils gets the same number. How many stickers per pupil?", "/"),
    ("The ferry takes {a} cars across in {b} equal trips. How many cars ride on each trip?", "/"),
    ("A farmer pours {a} litres of milk into churns of {b} litres. How many churns does she fill?", "/"),
    ("Our class of {b} pupils collected {a} leaves, every pupil the same amount. How many leaves did each pupil find?", "/"),
    ("A mason lays {a} tiles as a wall of {b} rows, all the same length. How many tiles sit in each row?", "/"),
    ("The cook divides {a} grams of rice among {b} plates evenly. How many grams land on each plate?", "/"),
    ("A choir of {a} singers stands in {b} equal lines. How many singers are in a line?", "/"),
    ("Volunteers stack {a} chairs, putting {b} chairs in every pile. How many piles do they make?", "/"),
    ("A cable car lifts {a} skiers in {b} full cabins of equal size. How many skiers ride in one cabin?", "/"),
    ("The gardener shares {a} tulip bulbs fairly between {b} flower boxes. How many bulbs get each box?", "/"),
]
PRACTICE_PLAIN = [  # plain prompts measured in the /practice report (a call is spurious); never practised
    "Which animal is known as the king of the jungle?", "What colour do you get by mixing blue and yellow?",
    "Name the season that comes after winter.", "What is the frozen form of water called?",
    "Which bird is a symbol of peace?", "How do you say hello in French?",
    "What do bees make?", "Which planet do we live on?", "What is the tallest animal on land?",
    "Introduce yourself in one sentence, assistant.",
]
ANSWERS = ["{q} is {r}.", "The answer is {r}.", "That's {r}.", "{q} = {r}."]
WORDS = {"*": "times", "+": "plus", "-": "minus", "/": "divided by"}
# Arithmetic in the identity data (written for the chat without tools): with the calculator offered, these go
# through it too, or the mix would teach both answering sums from memory and calling the tool.
ARITHMETIC_IN_IDENTITY = {
    "What is 100 divided by 4?": "100 / 4", "What is 2 plus 2?": "2 + 2", "What is 9 times 6?": "9 * 6",
    "What is 12 squared?": "12 ** 2", "What is 15 plus 27?": "15 + 27", "What is 7 times 8?": "7 * 8",
    "Great. What's 9 minus 4?": "9 - 4", "What is 6 times 7?": "6 * 7", "What is 3 times 3?": "3 * 3",
}
PLAIN_DEV = [  # dev plain questions (choosing settings): no call expected
    {"prompt": "Which planet is called the Red Planet?", "expect_any": ["mars"]},
    {"prompt": "What is the opposite of cold?", "expect_any": ["hot", "warm"]},
    {"prompt": "What language do people speak in Spain?", "expect_any": ["spanish"]},
    {"prompt": "Name a yellow fruit.", "expect_any": ["banana", "lemon", "pineapple", "mango"]},
    {"prompt": "What should I call you?", "expect_any": ["ember"]},
    {"prompt": "What is the capital of Italy?", "expect_any": ["rome"]},
    {"prompt": "Who wrote Romeo and Juliet?", "expect_any": ["shakespeare"]},
    {"prompt": "Give me a synonym for happy.", "expect_any": ["joy", "glad", "cheer", "content", "merry"]},
    {"prompt": "What colour is grass?", "expect_any": ["green"]},
    {"prompt": "Tell me who you are.", "expect_any": ["ember"]},
    {"prompt": "What is the largest ocean on Earth?", "expect_any": ["pacific"]},
    {"prompt": "Who painted the Mona Lisa?", "expect_any": ["leonardo", "vinci"]},
    {"prompt": "What language is mainly spoken in Brazil?", "expect_any": ["portuguese"]},
    {"prompt": "Which gas do plants take in from the air for photosynthesis?", "expect_any": ["carbon", "co2"]},
    {"prompt": "What do you call a baby cat?", "expect_any": ["kitten"]},
]
PLAIN_HELD_OUT = [  # no tool should be called for these (written with HELD_OUT_QUESTIONS)
    {"prompt": "Which instrument with black and white keys is found in most concert halls and played by pianists?", "expect_any": ["piano"]},
    {"prompt": "Name the organ in your chest that pumps blood around the body.", "expect_any": ["heart"]},
    {"prompt": "In which racket sport do players hit a shuttlecock over a high net?", "expect_any": ["badminton"]},
    {"prompt": "In which country would you find the Great Pyramids of Giza?", "expect_any": ["egypt"]},
    {"prompt": "During a storm, the bright flash you see in the sky before the thunder is called what?", "expect_any": ["lightning"]},
    {"prompt": "Who is usually credited with inventing the telephone?", "expect_any": ["bell"]},
    {"prompt": "Which ocean lies between Europe and North America?", "expect_any": ["atlantic"]},
    {"prompt": "what's the main ingredient in guacamole?", "expect_any": ["avocado"]},
    {"prompt": "Who was the first president of the United States?", "expect_any": ["washington"]},
    {"prompt": "Which flightless black-and-white bird waddles across Antarctic ice?", "expect_any": ["penguin"]},
]
IDENTITY_HELD_OUT = [  # the answer names Ember (written with HELD_OUT_QUESTIONS)
    "hi! who am i talking to?",
    "Hey, remind me, what name did your creators give you?",
    "do u have a name?",
    "Sorry, I didn't catch your name. What was it again?",
    "Can you introduce yourself, including your name?",
    "my sis just asked which AI bot im texting with rn lol, what do i tell her ur called?",
    "Hey there, does this chatbot have a name I can use?",
    "Before we start, mind giving a quick self-introduction, little assistant?",
    "Hey, before we start, is there something I'm supposed to be calling you?",
    "Before we start, could you tell me a little about yourself and what assistant I'm talking to?",
]


def numbers(rng: random.Random, op: str) -> tuple[int, int]:
    """The same sizes for every operation but division (exact), so the numbers do not give the operation away."""
    if op == "/":
        b = rng.randint(2, 25)
        return b * rng.randint(2, 40), b
    a, b = rng.randint(11, rng.choice([99, 999])), rng.randint(11, 99)
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def ngrams(template: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"{a}|{b}|[\w']+", template.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def exchange(question: str, expression: str, answer: str) -> list[dict]:
    """One question answered through the calculator: the call, its result, the answer."""
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}]},
        {"role": "tool", "name": "calculator", "content": calculator(expression)},
        {"role": "assistant", "content": answer},
    ]


def tool_row(question: str, a: int, b: int, op: str, rng: random.Random, schema: dict) -> dict:
    expression = f"{a} {op} {b}"
    answer = rng.choice(ANSWERS).format(q=f"{a} {WORDS[op]} {b}", r=calculator(expression))
    return {"messages": exchange(question.format(a=a, b=b), expression, answer[0].upper() + answer[1:]),
            "tools": [schema]}


def operation(row: dict) -> str:
    """The operator of a one-exchange calculator row's call ("97 * 91" -> "*")."""
    return row["messages"][1]["tool_calls"][0]["function"]["arguments"]["expression"].split()[1]


def with_calculator(row: dict, schema: dict, found: set[str]) -> dict:
    """An identity row with the calculator offered; its arithmetic questions (ARITHMETIC_IN_IDENTITY) answered
    through it, keeping the row's own answer."""
    messages: list[dict] = []
    for i, message in enumerate(row["messages"]):
        question = row["messages"][i - 1]["content"] if i else ""
        if message["role"] == "assistant" and question in ARITHMETIC_IN_IDENTITY:
            expression = ARITHMETIC_IN_IDENTITY[question]
            assert calculator(expression) in message["content"], (question, message["content"])
            messages[-1:] = exchange(question, expression, message["content"])
            found.add(question)
        else:
            messages.append(message)
    return {**row, "messages": messages, "tools": [schema]}


CONVERSATION_SIZES = (1, 2)  # calculator exchanges per row, in turn: 120 exchanges -> 80 rows


def in_conversations(rows: list[dict], plain: list[list[dict]], rng: random.Random, schema: dict) -> list[dict]:
    """The chat is one conversation, so the calculator exchanges come in rows of one or two (CONVERSATION_SIZES in
    turn), the second after one of another operation (so an earlier call's operator is not copied), and every
    row of two also has a plain question answered without a call after its first or second calculator exchange.
    With one-exchange rows only, the tuned model answered the questions after a chat's first with
    `<tool_response>` text; with a quarter of the rows two exchanges long, plain questions asked after arithmetic
    still got calls (dev probes in one conversation: 1 of 5 without a call; 3 of 5 with these rows)."""
    left = rows[:]
    rng.shuffle(left)
    out = []
    for n, size in enumerate(itertools.cycle(CONVERSATION_SIZES)):
        if not left:
            break
        chosen = [left.pop()]
        while len(chosen) < size:
            other = next((r for r in left if operation(r) != operation(chosen[-1])), None)
            if other is None:  # only rows of the same operation are left: they go one to a row
                break
            left.remove(other)
            chosen.append(other)
        exchanges = [r["messages"] for r in chosen]
        if n % 2:
            exchanges.insert(rng.randint(1, len(exchanges)), rng.choice(plain))
        out.append({"messages": [m for e in exchanges for m in e], "tools": [schema]})
    return out


def practice_tasks(taken: set[tuple[str, ...]]) -> list[dict]:
    """/practice demo tasks: each story problem once with its own numbers and the answer, then the plain prompts."""
    rng = random.Random(76)
    taken = taken.union(*(ngrams(str(p["prompt"])) for p in PLAIN_DEV + PLAIN_HELD_OUT),
                        *(ngrams(q) for q in IDENTITY_HELD_OUT))
    shared = {q: sorted(ngrams(q) & taken) for q in [q for q, _ in PRACTICE_QUESTIONS] + PRACTICE_PLAIN
              if ngrams(q) & taken}
    assert not shared, f"practice phrasings share four words in a row with another phrasing: {shared}"
    rows: list[dict] = []
    for q, op in PRACTICE_QUESTIONS:
        a, b = numbers(rng, op)
        rows.append({"prompt": q.format(a=a, b=b), "answer": json.loads(calculator(f"{a} {op} {b}"))})
    return rows + [{"prompt": p, "plain": True} for p in PRACTICE_PLAIN]


def main(out: Path = HERE) -> None:
    """Write the files into `out` (this folder by default)."""
    rng, dev_rng, held_rng = random.Random(7), random.Random(71), random.Random(75)  # each set has its own numbers
    schema = asyncio.run(make_toolkit([calculator]).get_tool_schemas())[0]
    phrasings = TRAIN_QUESTIONS + MORE_QUESTIONS
    train = [tool_row(q, *numbers(rng, op), op, rng, schema) for _ in range(TRAIN_REPEATS) for q, op in phrasings]
    eval_rows = [tool_row(q, *numbers(dev_rng, op), op, dev_rng, schema) for q, op in DEV_QUESTIONS]
    seen = set().union(*(ngrams(q) for q, _ in phrasings + DEV_QUESTIONS + DEV_PROBE_QUESTIONS
                         + SECOND_DEV_PROBE_QUESTIONS))
    for q, _ in HELD_OUT_QUESTIONS:  # "phrased unlike any training row": no four words in a row in common
        assert not ngrams(q) & seen, f"held-out {q!r} shares {sorted(ngrams(q) & seen)} with a training or dev phrasing"
    held = [(q, *numbers(held_rng, op), op) for q, op in HELD_OUT_QUESTIONS]
    dev_probe_rng = random.Random(72)  # dev probes: generated answers on the dev phrasings, also for choosing settings
    dev = [(q, *numbers(dev_probe_rng, op), op) for _ in range(3) for q, op in DEV_QUESTIONS]
    first_held_rng = random.Random(70)  # the numbers the first held-out set was asked with
    dev += [(q, *numbers(first_held_rng, op), op) for q, op in DEV_PROBE_QUESTIONS]
    second_held_rng = random.Random(74)  # and the second
    dev += [(q, *numbers(second_held_rng, op), op) for q, op in SECOND_DEV_PROBE_QUESTIONS]
    probes, dev_probes = ({"arithmetic": [{"prompt": q.format(a=a, b=b), "expression": f"{a} {op} {b}",
                                           "result": calculator(f"{a} {op} {b}")} for q, a, b, op in questions],
                           "plain": plain} for questions, plain in ((held, PLAIN_HELD_OUT), (dev, PLAIN_DEV)))
    # The chat offers the calculator on every turn, so the identity rows are trained with it offered too: no call,
    # but for their few arithmetic questions.
    found: set[str] = set()
    identity, identity_eval = ([with_calculator(json.loads(line), schema, found) for line in
                                (HERE / name).read_text().splitlines() if line.strip()]
                               for name in ("ember_train.jsonl", "ember_eval.jsonl"))
    assert found == set(ARITHMETIC_IN_IDENTITY), f"not in the identity data: {set(ARITHMETIC_IN_IDENTITY) - found}"
    plain = [row["messages"][:2] for row in identity if "tool_calls" not in row["messages"][1]]
    asked = set().union(*(ngrams(m["content"]) for row in identity + identity_eval for m in row["messages"]
                          if m["role"] == "user"))
    for q in IDENTITY_HELD_OUT + [str(p["prompt"]) for p in PLAIN_HELD_OUT]:
        assert not ngrams(q) & asked, f"held-out {q!r} shares {sorted(ngrams(q) & asked)} with an identity row"
    probes["identity"] = IDENTITY_HELD_OUT  # the dev probes use data/ember_probes.json's
    train = in_conversations(train, plain, random.Random(73), schema)

    def write(name: str, rows: list[dict]) -> None:
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    write("ember_tools_train.jsonl", train)
    write("ember_practice.jsonl", practice_tasks(seen | set().union(*(ngrams(q) for q, _ in HELD_OUT_QUESTIONS))
                                                 | asked))
    write("ember_agent_train.jsonl", identity + train)
    write("ember_agent_eval.jsonl", identity_eval + eval_rows)
    for name, content in (("ember_tool_probes.json", probes), ("ember_tool_dev_probes.json", dev_probes)):
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    print(f"{len(train)} tool rows, {len(identity)} identity rows, {len(identity_eval) + len(eval_rows)} eval rows, "
          f"{len(held)} held-out arithmetic probes, {len(dev)} dev probes")


if __name__ == "__main__":
    main()
