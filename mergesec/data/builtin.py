"""Builtin datasets generated from templates and word lists, deterministic and offline.

Every builtin is produced by a fixed-seed ``random.Random`` (pure Python, no downloads), so the
same name always gives the same examples on every machine. The datasets deliberately share
vocabulary and sentence frames: topic sentences carry sentiment words, negation statements cover
the four news topics, questions mention sports, tech, politics and food entities, and each task
mixes in cues from the others (contrast clauses, near-miss words, distractor appositives). Labels
are fixed by construction, without label noise.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

from mergesec.data.splits import DatasetSplits, Example

# Per dataset: train, validation, test sizes (divisible by every label count used below).
SIZES = (1200, 200, 400)

Rng = random.Random
T = TypeVar("T")
SlotValue = tuple[str, ...] | Callable[[Rng], str]

# ---------------------------------------------------------------------------------------------
# Shared vocabulary
# ---------------------------------------------------------------------------------------------

FIRST_NAMES = (
    "Maria", "James", "Aisha", "Kenji", "Lucas", "Priya", "Tom", "Elena", "Omar", "Sofia",
    "Daniel", "Mei", "Carlos", "Hannah", "Ivan", "Grace", "Noah", "Fatima", "Leo", "Zoe",
    "Ravi", "Anna", "Samuel", "Yuki",
)  # fmt: skip
LAST_NAMES = (
    "Silva", "Okafor", "Tanaka", "Miller", "Rossi", "Novak", "Khan", "Garcia", "Lindqvist",
    "Dubois", "Chen", "Park", "Moreau", "Adeyemi", "Kowalski", "Brennan", "Haddad", "Fischer",
)  # fmt: skip
CITIES = (
    "Lisbon", "Denver", "Osaka", "Nairobi", "Glasgow", "Porto", "Austin", "Lyon", "Seoul",
    "Melbourne", "Toronto", "Valencia", "Krakow", "Dublin", "Bristol", "Oslo", "Cape Town",
    "Montreal",
)  # fmt: skip
WHEN_PAST = (
    "on Monday", "on Tuesday", "on Wednesday", "on Thursday", "on Friday", "on Saturday",
    "on Sunday", "last night", "last week", "this morning", "earlier this month",
    "over the weekend", "yesterday",
)  # fmt: skip
WHEN_FUTURE = (
    "next week", "on Sunday", "later this month", "next season", "this weekend",
    "next spring", "on Friday night", "in the autumn",
)  # fmt: skip
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
YEARS = tuple(str(y) for y in range(2008, 2025))

TEAMS = (
    "the Rovers", "the Falcons", "the Harbor Kings", "the Red Lions", "the city club",
    "the national team", "the Wanderers", "the Blue Herons",
)  # fmt: skip
SPORT_EVENTS = (
    "the derby", "the cup final", "the semi-final", "the season opener", "the league match",
    "the title decider", "the relay final", "the city marathon", "the away game",
)  # fmt: skip
COMPANIES = (
    "Nimbus", "Voltra", "Quantix", "Brightwave", "Corelink", "Pixelforge", "Lumentra",
    "Orbitel",
)  # fmt: skip
GADGETS = (
    "phone", "laptop", "smartwatch", "tablet", "camera", "router", "game console", "e-reader",
    "headset", "speaker",
)  # fmt: skip
TECH_FEATURES = (
    "a brighter screen", "a faster chip", "longer battery life", "a sharper camera",
    "more storage", "a lighter frame", "a redesigned keyboard", "faster charging",
)  # fmt: skip
OFFICIALS = (
    "the minister", "the mayor", "the senator", "the governor", "the prime minister",
    "the opposition leader", "the finance minister", "the health minister",
)  # fmt: skip
CHAMBERS = ("parliament", "the senate", "the city council", "the regional assembly")
POLICIES = (
    "the housing bill", "the tax reform", "the budget", "the climate plan", "the transport law",
    "the trade agreement", "the pension reform", "the school funding plan",
)  # fmt: skip
PARTIES = (
    "the Green Party", "the Liberal Party", "the Labour group", "the centre-right alliance",
    "the Farmers' Party", "the Progressive Union",
)  # fmt: skip
ISSUES = (
    "rising rents", "the hospital budget", "the new airport", "fuel prices",
    "the trade dispute", "school closures", "the water shortage", "public transport fares",
)  # fmt: skip
VENUES = (
    "the bistro", "the ramen bar", "the bakery", "the seafood restaurant", "the pizzeria",
    "the taqueria", "the vegan cafe", "the steakhouse", "the noodle shop", "the food market",
)  # fmt: skip
DISHES = (
    "the pasta", "the curry", "the soup", "the burger", "the risotto", "the steak",
    "the sourdough", "the lamb stew", "the cheesecake", "the pad thai", "the paella",
    "the fried chicken",
)  # fmt: skip
CUISINES = ("Italian", "Thai", "Mexican", "Japanese", "Lebanese", "Ethiopian", "Korean", "Greek")
INGREDIENTS = ("olive oil", "coffee", "cocoa", "rice", "wheat", "saffron", "vanilla", "sugar")

POS_ADJ = (
    "excellent", "wonderful", "fantastic", "superb", "impressive", "outstanding", "brilliant",
    "great", "lovely", "first-rate", "terrific", "pleasant", "top-notch",
)  # fmt: skip
NEG_ADJ = (
    "terrible", "awful", "disappointing", "dreadful", "mediocre", "poor", "frustrating", "weak",
    "sloppy", "dismal", "lousy", "underwhelming", "shoddy",
)  # fmt: skip
POS_NEWS = ("stunning", "remarkable", "welcome", "brilliant", "historic", "impressive")
NEG_NEWS = ("dismal", "humiliating", "bitter", "disastrous", "painful", "embarrassing")


def _name(rng: Rng) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


# fmt: off
SLOTS: dict[str, SlotValue] = {
    "name": _name, "first": FIRST_NAMES, "last": LAST_NAMES, "city": CITIES,
    "when": WHEN_PAST, "when_future": WHEN_FUTURE, "weekday": WEEKDAYS, "year": YEARS,
    "team": TEAMS, "sport_event": SPORT_EVENTS,
    "score": ("1-0", "2-1", "3-1", "2-0", "4-2", "3-0", "5-1", "3-2"),
    "score_draw": ("0-0", "1-1", "2-2", "3-3"),
    "company": COMPANIES, "gadget": GADGETS, "feature": TECH_FEATURES,
    "official": OFFICIALS, "chamber": CHAMBERS, "policy": POLICIES, "party": PARTIES,
    "issue": ISSUES, "venue": VENUES, "dish": DISHES,
    "dish_plain": tuple(d.removeprefix("the ") for d in DISHES),
    "cuisine": CUISINES, "ingredient": INGREDIENTS,
    "pos_adj": POS_ADJ, "neg_adj": NEG_ADJ, "pos_news": POS_NEWS, "neg_news": NEG_NEWS,
    "n": ("two", "three", "four", "five", "six", "seven", "eight", "twelve", "fifteen", "twenty"),
    "fan_mood": ("delighted", "furious", "heartbroken", "thrilled", "frustrated", "stunned"),
    "weather": ("heavy rain", "a waterlogged pitch", "high winds", "a snowstorm", "fog"),
    "moved": ("rose sharply", "fell sharply", "jumped", "slumped", "climbed", "dropped"),
    "feature_noun": ("battery life", "bright screen", "camera", "keyboard", "fast charging",
                     "light frame", "speakers"),
    "flaw": ("dim screen", "short battery life", "buggy software", "high price", "weak speaker"),
    "period": ("last season", "this season", "in the cup", "in their first season", "in 2019"),
    "doc_sg": ("report", "budget", "menu", "invoice", "contract", "press release", "venue plan",
               "draft agenda", "proposal"),
    "doc": ("report", "slides", "budget figures", "match tickets", "menu", "invoice", "contract",
            "meeting notes", "press release", "quarterly accounts", "venue plan", "draft agenda"),
    "topic_obj": ("the new laptop order", "the housing bill", "Saturday's match",
                  "the catering for the launch", "the tax reform", "the team dinner",
                  "the software update", "the election debate", "the stadium tickets",
                  "the restaurant booking", "the phone contract", "the council meeting",
                  "the cup final travel", "the office lunch"),
    "event_inv": ("the product launch", "the team dinner", "the charity match",
                  "the budget briefing", "the tasting evening", "the election night party",
                  "the club's awards night", "the tech meetup", "the wine tasting"),
    "task": ("the conference booking", "the new phone setup", "the match tickets",
             "the council application", "the restaurant reservation", "the software licence",
             "the travel plans", "the laptop repair"),
    "problem": ("the cancelled match", "the delayed update", "the late delivery",
                "the power cut at the restaurant", "the postponed debate", "the billing error",
                "the double booking"),
}
# fmt: on


_FIELD = re.compile(r"\{([a-z_]+?)(\d*)\}")
_SPACE_BEFORE_PUNCT = re.compile(r" ([,;:.?!])")
_A_VOWEL = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")
_NON_WORD = re.compile(r"[^a-z0-9']+")


def _fill(rng: Rng, template: str, extra: dict[str, SlotValue] | None = None) -> str:
    """Replace ``{slot}`` fields from ``SLOTS``; repeated slots (``{team}``, ``{team2}``) differ."""
    used: dict[str, set[str]] = {}

    def sub(m: re.Match[str]) -> str:
        base = m.group(1)
        source = (extra or {}).get(base) or SLOTS[base]
        seen = used.setdefault(base, set())
        value = ""
        for _ in range(20):
            value = source(rng) if callable(source) else rng.choice(source)
            if value not in seen:
                break
        seen.add(value)
        return value

    for _ in range(4):
        if "{" not in template:
            break
        new = _FIELD.sub(sub, template)
        if new == template:
            break
        template = new
    return template


def _finish(text: str, end: str = ".") -> str:
    """Tidy spacing, capitalise the first letter and make sure the sentence ends."""
    text = " ".join(text.split())
    if " " in text:
        text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
        text = _A_VOWEL.sub(r"\1n ", text)
    if end and text[-1] not in ".?!":
        text += end
    return text[0].upper() + text[1:]


# ---------------------------------------------------------------------------------------------
# sentiment: review sentences, (negative, positive)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ReviewDomain:
    targets: tuple[str, ...]
    visit: str  # how the reviewer met the target, with {t}
    aspects: tuple[str, ...]  # a trailing "*" marks a plural noun phrase
    pos_target: tuple[str, ...]
    neg_target: tuple[str, ...]
    pos_verdicts: tuple[str, ...]
    neg_verdicts: tuple[str, ...]
    neutral: tuple[str, ...]


# fmt: off
_REVIEW_DOMAINS = (
    _ReviewDomain(
        targets=("the {company} {gadget}", "this {gadget}", "my new {gadget}", "the new {gadget}",
                 "the {gadget} from {company}"),
        visit="I bought {t} {when}",
        aspects=("the battery", "the screen", "the keyboard", "the camera", "the sound",
                 "the setup", "the software", "the build quality", "the charger",
                 "the customer support", "the price", "the buttons*", "the speakers*"),
        pos_target=("reliable", "fast", "sturdy", "intuitive", "responsive", "a joy to use"),
        neg_target=("sluggish", "flimsy", "buggy", "unreliable", "clunky", "a pain to use"),
        pos_verdicts=("it was worth every penny", "I would buy it again",
                      "I use it every day now", "I can't recommend it enough",
                      "I have no complaints at all", "it does exactly what I need"),
        neg_verdicts=("I returned it after a week", "save your money", "it broke within a month",
                      "I regret buying it", "I wouldn't buy it again", "it was a waste of money"),
        neutral=("I have used it for about two weeks", "It arrived {when}",
                 "I bought it as a gift for my daughter",
                 "It costs a little under three hundred dollars", "I mostly use it for work",
                 "I switched from an older {company} model"),
    ),
    _ReviewDomain(
        targets=("the film", "the documentary about {sport_event}", "the new political thriller",
                 "the sequel", "the biopic about a famous chef", "the sports drama",
                 "the series about the election", "the animated film", "the heist movie",
                 "the courtroom drama", "the film about a tech startup"),
        visit="I watched {t} {when}",
        aspects=("the acting", "the plot", "the soundtrack", "the ending", "the dialogue",
                 "the pacing", "the cinematography", "the script", "the lead performance",
                 "the opening scene", "the special effects*", "the jokes*"),
        pos_target=("gripping", "moving", "witty", "beautifully shot", "clever", "heartfelt"),
        neg_target=("boring", "predictable", "dull", "clumsy", "forgettable", "tedious"),
        pos_verdicts=("I would happily watch it again", "it is the best film I've seen this year",
                      "I loved every minute of it", "do not miss it", "it never drags",
                      "I can't stop thinking about it"),
        neg_verdicts=("I nearly walked out", "it was a waste of two hours",
                      "I checked my phone the whole time", "I can't understand the hype",
                      "I would not watch it again", "it felt twice as long as it was"),
        neutral=("We saw it on opening night", "It runs just over two hours",
                 "I watched it with my brother", "It is based on a true story",
                 "The cinema in {city} was half full", "It was filmed in {city}"),
    ),
    _ReviewDomain(
        targets=("the bistro", "the ramen bar", "the seafood restaurant", "the pizzeria",
                 "the taqueria", "the vegan cafe", "the steakhouse", "the noodle shop",
                 "the new {cuisine} place downtown", "the {cuisine} restaurant near the station"),
        visit="we had dinner at {t} {when}",
        aspects=("the food", "the service", "the soup", "the dessert", "the staff",
                 "the wine list", "the atmosphere", "the bread", "the main course", "{dish}",
                 "the portions*", "the prices*"),
        pos_target=("delicious", "cosy", "welcoming", "spotless", "charming", "good value"),
        neg_target=("bland", "greasy", "noisy", "overpriced", "dirty", "chaotic"),
        pos_verdicts=("we will definitely be back", "I can't wait to go back",
                      "it was worth the wait", "we left very happy", "every dish was a treat",
                      "I'd book again tomorrow"),
        neg_verdicts=("we won't be going back", "we left hungry and annoyed",
                      "it was not worth the price", "I sent my plate back", "never again",
                      "we should have stayed home"),
        neutral=("We booked a table for four", "We went there for my mother's birthday",
                 "It is close to the station", "We ordered three courses",
                 "It opened last spring", "We were seated by the window"),
    ),
    _ReviewDomain(
        targets=("the match", "the stadium tour", "the tech conference", "the town hall debate",
                 "the food festival", "the concert", "the product launch", "the charity run",
                 "{sport_event}"),
        visit="I went to {t} {when}",
        aspects=("the organisation", "the atmosphere", "the seating", "the schedule",
                 "the main speaker", "the sound system", "the ticket price", "the food stalls*",
                 "the queues*"),
        pos_target=("lively", "well organised", "smooth", "inspiring", "memorable", "fun"),
        neg_target=("chaotic", "badly organised", "tiresome", "messy", "stressful", "a letdown"),
        pos_verdicts=("I'm already planning to go next year", "it was worth the trip",
                      "I would recommend it to anyone", "we had a great time",
                      "I'd happily pay again"),
        neg_verdicts=("I left before the end", "it was not worth the trip", "I want my money back",
                      "I won't bother next year", "what a waste of an evening"),
        neutral=("It was held in {city}", "About two thousand people came",
                 "I went with a few colleagues", "It lasted most of the day"),
    ),
)
# fmt: on


_INTENSIFIERS = ("", "", "", "really", "truly", "genuinely", "quite", "absolutely")
_CONTEXT_POS = (
    "after a great win for my team", "on a lovely sunny afternoon",
    "to celebrate a happy anniversary", "after glowing reviews in the press",
    "on the best day of my holiday", "after some wonderful news at work",
)  # fmt: skip
_CONTEXT_NEG = (
    "after a terrible week at work", "on a miserable rainy evening",
    "the day my team lost the final", "after reading some angry headlines",
    "while I was stuck at home with a cold", "after a disastrous job interview",
)  # fmt: skip


def _aspect(rng: Rng, dom: _ReviewDomain, avoid: str = "") -> tuple[str, str]:
    """An aspect noun phrase and its past-tense 'be' ('was' or 'were')."""
    for _ in range(10):
        a = rng.choice(dom.aspects)
        if a.rstrip("*") != avoid:
            break
    be = "were" if a.endswith("*") else "was"
    return _fill(rng, a.rstrip("*")), be


def _sentiment(rng: Rng, label: int) -> str:
    dom = rng.choice(_REVIEW_DOMAINS)
    pos = label == 1
    t = _fill(rng, rng.choice(dom.targets))

    def adj(p: bool) -> str:
        return rng.choice(POS_ADJ if p else NEG_ADJ)

    def tadj(p: bool) -> str:
        return rng.choice((dom.pos_target + POS_ADJ) if p else (dom.neg_target + NEG_ADJ))

    def verdict(p: bool) -> str:
        return rng.choice(dom.pos_verdicts if p else dom.neg_verdicts)

    a1, be1 = _aspect(rng, dom)
    a2, be2 = _aspect(rng, dom, avoid=a1)
    it = "they" if be1 == "were" else "it"
    intens = rng.choice(_INTENSIFIERS)
    kind = rng.choices(("simple", "pair", "contrast", "negated", "context"), (2, 2, 3, 2, 2))[0]
    if kind == "simple":
        body = rng.choice(
            (
                f"{t} was {intens} {tadj(pos)}",
                f"{a1} {be1} {intens} {adj(pos)}",
                f"{_fill(rng, dom.visit, {'t': (t,)})} and {a1} {be1} {adj(pos)}",
            )
        )
    elif kind == "pair":
        body = f"{a1} {be1} {adj(pos)} and {a2} {be2} {intens} {adj(pos)}"
    elif kind == "contrast":
        opp = not pos
        body = rng.choice(
            (
                f"{a1} {be1} {adj(opp)}, but {a2} {be2} {adj(pos)} and {verdict(pos)}",
                f"although {a1} {be1} {adj(opp)}, {t} was {tadj(pos)} overall",
                f"{a1} {be1} {adj(opp)}; still, {verdict(pos)}",
                f"I expected {t} to be {tadj(opp)}, but it was {intens} {tadj(pos)}",
                f"everyone told me {t} was {tadj(opp)}, yet I found it {tadj(pos)}",
            )
        )
    elif kind == "negated":
        if pos:
            body = rng.choice(
                (
                    f"I have no complaints about {a1}",
                    f"I couldn't be happier with {t}",
                    f"{a1} never let me down",
                    f"I can't recommend {t} enough",
                    f"there was nothing wrong with {a1}",
                    f"I was not disappointed by {t} at all",
                    f"{a1} {be1}n't {adj(False)} at all; in fact {it} {be1} {adj(True)}",
                )
            )
        else:
            body = rng.choice(
                (
                    f"I wouldn't recommend {t} to anyone",
                    f"{a1} {be1} not good enough",
                    f"{t} did not live up to the hype",
                    f"there was nothing I liked about {a1}",
                    f"I didn't enjoy {t} at all",
                    f"{a1} {be1} not {adj(True)} at all; frankly {it} {be1} {adj(False)}",
                )
            )
    else:
        ctx = rng.choice(_CONTEXT_POS + _CONTEXT_NEG)
        visit = dom.visit.replace(" {when}", "")
        body = f"{_fill(rng, visit, {'t': (t,)})} {ctx}, and {a1} {be1} {adj(pos)}"
    text = _finish(_fill(rng, body))
    extra = rng.random()
    if extra < 0.25:
        text = f"{_finish(_fill(rng, rng.choice(dom.neutral)))} {text}"
    elif extra < 0.45 and kind not in ("contrast",):
        text = f"{text} {_finish(verdict(pos))}"
    return text


# ---------------------------------------------------------------------------------------------
# topic: news sentences, (sports, technology, politics, food)
# ---------------------------------------------------------------------------------------------

_TOPIC_TEMPLATES: tuple[tuple[str, ...], ...] = (
    (  # sports
        "{team} beat {team2} {score} in {sport_event} {when}.",
        "{team} suffered a {neg_news} {score} defeat to {team2} {when}.",
        "{name} scored twice as {team} won {sport_event} in front of a record crowd.",
        "{team} sacked their coach after a {neg_news} run of five straight losses.",
        "{name} signed a three-year contract with {team} {when}.",
        "Fans were {fan_mood} after {team} drew {score_draw} with {team2} at home.",
        "{name} broke the national record in the 400 metres at the championships in {city}.",
        "{sport_event} between {team} and {team2} was postponed because of {weather}.",
        "{name} will miss {sport_event} with a knee injury, {team} confirmed {when}.",
        "{team} clinched the league title with two games to spare after a {pos_news} season.",
        "The referee sent off two players in a {neg_news} derby between {team} and {team2}.",
        "{name} won gold in the cycling road race in {city} after a {pos_news} late attack.",
        "{team} have not lost at home since the start of the season.",
        "{name}, a former software engineer, scored the winning goal for {team} {when}.",
        "Watched by {official} from the stands, {team} came from behind to beat {team2}.",
        "The tennis star {name} reached the quarter-finals of the open in {city}.",
    ),
    (  # technology
        "{company} unveiled a new {gadget} with {feature} at its annual event in {city}.",
        "A software update for the {company} {gadget} fixed a bug that drained the battery.",
        "{company} shares {moved} after the firm reported {pos_news} sales of its {gadget}.",
        "{company} shares {moved} after {neg_news} sales of its latest {gadget}.",
        "Researchers at {company} built a chip that runs language models on a {gadget}.",
        "Reviewers called the new {company} {gadget} {pos_adj} and praised its {feature_noun}.",
        "Reviewers called the new {company} {gadget} {neg_adj}, citing its {flaw}.",
        "{company} said a security flaw exposed the data of {n} million users.",
        "Engineers at {company} are testing self-driving delivery robots in {city}.",
        "{company} will stop updating its older {gadget} models next year, angering customers.",
        "The {company} app now translates voice messages offline in twelve languages.",
        "{company} agreed to buy the chip designer {company2} for {n} billion dollars.",
        "A cyberattack knocked {company}'s cloud service offline for six hours {when}.",
        "{company} opened a new data centre in {city} powered by solar energy.",
        "The new {gadget} from {company} sold out within hours of its launch {when}.",
        "{name}, {company}'s chief engineer, said the next {gadget} will ship with {feature}.",
        "{company}, whose founder played professional football, released a cheaper {gadget}.",
        "At a launch catered by a famous chef, {company} showed off a foldable {gadget}.",
    ),
    (  # politics
        "{official} unveiled {policy} {when}, calling it a {pos_news} step for families.",
        "{chamber} voted to pass {policy} after a long and {neg_news} debate.",
        "{chamber} rejected {policy} in a {neg_news} defeat for the government.",
        "{name} won the mayoral election in {city} by fewer than {n} hundred votes.",
        "Thousands of protesters gathered in {city} to oppose {policy}.",
        "{official} resigned after a {neg_news} row over {issue}.",
        "Ministers will meet {when_future} to discuss {issue}.",
        "Voters in {city} go to the polls {when_future} in a closely watched election.",
        "{party} promised to cut taxes and tackle {issue} in its manifesto.",
        "Opposition leaders accused {official} of misleading parliament about {issue}.",
        "The government survived a confidence vote {when} by a narrow margin.",
        "A new poll shows support for {party} falling to its lowest level in a decade.",
        "{chamber} delayed the vote on {policy} until after the summer recess.",
        "{official}, a former footballer, defended {policy} at a press conference {when}.",
        "Speaking after a dinner with restaurant owners, {official} promised help with {issue}.",
        "{official} announced a ban on phones in schools as part of {policy}.",
        "Lawmakers approved a tax on sugary drinks, ending a {neg_news} fight with {party}.",
    ),
    (  # food
        "{name} opened a {cuisine} restaurant in {city}, serving {dish_plain} and homemade bread.",
        "{venue} in {city} earned its first Michelin star {when}.",
        "Home cooks are sharing a {pos_news} new recipe for {dish_plain} made with {ingredient}.",
        "Prices of {ingredient} rose sharply after a poor harvest, worrying bakers and cafes.",
        "The annual food festival in {city} drew {n} thousand visitors who queued for {dish_plain}.",
        "{name}'s cookbook on {cuisine} cooking became a bestseller {when}.",
        "Critics called the tasting menu at {venue} {pos_adj}, singling out {dish}.",
        "Critics found the tasting menu at {venue} {neg_adj}, especially {dish}.",
        "{venue} in {city} closed its doors after thirty years of serving {dish_plain}.",
        "The chef {name} won the national baking contest with a cake flavoured with {ingredient}.",
        "Food inspectors closed {venue} in {city} after complaints from diners.",
        "{cuisine} street food is the fastest-growing trend in {city}, restaurant owners say.",
        "{name}, a former senator, opened a small {cuisine} cafe in {city}.",
        "As fans arrived for {sport_event}, street vendors sold out of {dish_plain} in minutes.",
        "A bakery in {city} now uses an app to sell leftover bread at half price.",
        "{venue} changed its menu {when} after a {neg_news} review of {dish}.",
        "Chefs in {city} say the price of {ingredient} has doubled since the spring.",
    ),
)
_TOPIC_LEADS: tuple[tuple[str, ...], ...] = (
    ("Despite the heavy rain, ", "Live-streamed on a new app, ", "In a week of election news, "),
    (
        "Weeks after the election, ",
        "In a week dominated by the cup final, ",
        "Amid complaints from restaurant owners, ",
    ),
    (
        "Amid rising food prices, ",
        "As the football season got under way, ",
        "Amid a row over phone tariffs, ",
    ),
    (
        "Just weeks after the election, ",
        "Inspired by a viral video, ",
        "During a busy week of football, ",
    ),
)
# Short past-tense events per topic, used as the background of another topic's story.
_TOPIC_CONTEXT = (
    ("{team} beat {team2} {score}", "{name} scored twice in {sport_event}",
     "{team} sacked their coach", "{team} won {sport_event}",
     "fans booed the referee at {sport_event}"),
    ("{company} unveiled a new {gadget}", "{company} shares {moved}", "a cyberattack hit {company}",
     "{company} released an update for its {gadget}", "{company} launched a cheaper {gadget}"),
    ("{chamber} rejected {policy}", "{official} resigned over {issue}",
     "{name} won the mayoral election in {city}", "{chamber} passed {policy}",
     "protesters marched against {policy} in {city}"),
    ("{venue} in {city} earned a Michelin star", "prices of {ingredient} rose sharply",
     "{name} opened a {cuisine} restaurant in {city}",
     "the food festival in {city} drew huge crowds", "food inspectors closed {venue} in {city}"),
)  # fmt: skip
# {m}: the story (the label's topic), {d}: background from another topic.
_CONTEXT_FRAMES = (
    "hours after {d}, {m}", "{M}, just days after {d}", "{M}, on the same day that {d}",
    "a week after {d}, {m}", "as {d}, {m}",
)  # fmt: skip
_PROPER_STARTS = frozenset(COMPANIES + FIRST_NAMES + CUISINES)


def _lower_first(text: str) -> str:
    if text.split(" ", 1)[0].rstrip(",").removesuffix("'s") in _PROPER_STARTS:
        return text
    return text[0].lower() + text[1:]


def _topic(rng: Rng, label: int) -> str:
    text = _fill(rng, rng.choice(_TOPIC_TEMPLATES[label]))
    r = rng.random()
    if r < 0.25:
        other = rng.choice([t for t in range(len(_TOPIC_CONTEXT)) if t != label])
        d = _fill(rng, rng.choice(_TOPIC_CONTEXT[other]))
        m = text.rstrip(".")
        frame = rng.choice(_CONTEXT_FRAMES)
        text = frame.replace("{M}", m).replace("{m}", _lower_first(m)).replace("{d}", d)
    elif r < 0.4 and "," not in text:
        text = _fill(rng, rng.choice(_TOPIC_LEADS[label])) + _lower_first(text)
    return _finish(text)


# ---------------------------------------------------------------------------------------------
# question: what a question asks for, (person, place, time, number)
# ---------------------------------------------------------------------------------------------

_QUESTION_TEMPLATES: tuple[tuple[str, ...], ...] = (
    (  # person
        "Who scored the winning goal for {team} in {sport_event}?",
        "Who is the current coach of {team}?",
        "Which player did {team} sign {when}?",
        "Who founded {company}?",
        "Who designed the new {company} {gadget}?",
        "Who introduced {policy} in {chamber}?",
        "Which minister resigned over {issue}?",
        "Who is the head chef at {venue} in {city}?",
        "Whose recipe for {dish_plain} won the baking contest in {city}?",
        "What is the name of the referee who sent off two players in {sport_event}?",
        "Can you tell me who will lead {company} after {year}?",
        "Do you know which senator voted against {policy}?",
        "Who won the mayoral election in {city} in {year}?",
        "Which engineer led the team that built the {company} {gadget}?",
        "Who was captain of {team} when they won {sport_event} in {year}?",
        "Who will replace {official} if the government loses the vote on {policy}?",
        "Which critic wrote the review of {venue} in {city}?",
        "Which chef cooked for {official} at the stadium in {city}?",
        "Which player moved to {city} in {year} after {sport_event}?",
        "Which engineer at {company} spent {n} years in {city}?",
        "What senator visited the stadium in {city} in {year}?",
        "Who was mayor of {city} when {team} won {sport_event}?",
        "Who owned the restaurant where {official} had dinner in {year}?",
    ),
    (  # place
        "Where will {sport_event} be played {when_future}?",
        "In which city did {company} open its new research lab in {year}?",
        "Which stadium hosts {sport_event} {when_future}?",
        "Where is the new {company} {gadget} manufactured?",
        "Where did {official} give the speech about {policy}?",
        "Which country produces most of the world's {ingredient}?",
        "What city is {venue} located in?",
        "Where can I find the best {dish_plain} in {city}?",
        "Do you know where {name} grew up?",
        "From which region does the {ingredient} in {dish} come?",
        "Where did {team} train before {sport_event} in {year}?",
        "In which country was {name} born?",
        "Which neighbourhood of {city} has the most {cuisine} restaurants?",
        "Where will {chamber} meet while the building is being repaired?",
        "Where did {name} go after leaving {company} in {year}?",
        "At which venue will {party} hold its conference {when_future}?",
        "Which city did the chef from {venue} move to in {year}?",
        "In which stadium did {official} watch {sport_event} in {year}?",
        "Which country did {name} visit {n} times in {year}?",
        "What city did the engineers from {company} move to after {year}?",
        "Where did the player who scored in {sport_event} grow up?",
        "Where was {official} when {chamber} voted on {policy}?",
    ),
    (  # time
        "When does {sport_event} kick off?",
        "What time does {venue} open on {weekday}s?",
        "In what year did {company} release its first {gadget}?",
        "When will {chamber} vote on {policy}?",
        "On which day is the mayoral election in {city} held?",
        "When does the new {company} {gadget} go on sale in {city}?",
        "When did {name} open {venue} in {city}?",
        "At what time does {sport_event} start in {city}?",
        "Can you tell me when {name} became coach of {team}?",
        "In which month does the food festival in {city} take place?",
        "How soon will the update for the {company} {gadget} arrive?",
        "What year did {team} last win {sport_event}?",
        "When was {policy} first proposed?",
        "When did {official} announce the plan to tackle {issue}?",
        "Until what date can voters in {city} register for the election?",
        "Which day of the week does {venue} in {city} serve {dish_plain}?",
        "In which year did the chef from {venue} move to {city}?",
        "Which season did {name} spend at the stadium in {city}?",
        "What month did {official} visit the team in {city}?",
        "When did the player who moved to {city} score {n} goals?",
        "When did the engineers at {company} move to {city}?",
        "In what year did {n} chefs open restaurants in {city}?",
    ),
    (  # number
        "How many goals did {name} score for {team} {period}?",
        "How much does the new {company} {gadget} cost in {city}?",
        "What was the final score in {sport_event} {when}?",
        "How many seats does {party} hold in {chamber}?",
        "What percentage of voters in {city} backed {policy}?",
        "How many people attended the food festival in {city} in {year}?",
        "How much storage does the {company} {gadget} have?",
        "How many calories are in {dish} at {venue}?",
        "What is the capacity of the stadium where {team} play?",
        "Do you know how many votes {name} received in {city}?",
        "How old was {name} when {team} won {sport_event}?",
        "How many employees does {company} have in {city}?",
        "What is the population of {city}?",
        "How much did {chamber} spend on {issue} in {year}?",
        "How many times have {team} won {sport_event}?",
        "How many dishes are on the tasting menu at {venue}?",
        "How many chefs moved to {city} in {year}?",
        "How many years did {name} spend at the stadium in {city}?",
        "How many players did {team} sign in the year {company} was founded?",
        "What share of voters in {city} supported {official} in {year}?",
        "How many times did {official} visit the stadium in {city}?",
        "How many people who work at {company} moved to {city}?",
    ),
)


# Questions whose answer type rests on one head noun; the same nouns occur as plain content
# in the other kinds of question.
_QUESTION_HEADS = (
    ("player", "coach", "chef", "minister", "engineer", "senator", "referee"),
    ("city", "stadium", "country", "neighbourhood", "venue", "region"),
    ("year", "season", "month", "decade", "day"),
)  # fmt: skip
_QUESTION_PLURALS = ("players", "coaches", "chefs", "cities", "stadiums", "countries", "years",
                     "seasons", "months")  # fmt: skip
_QUESTION_FRAMES = (
    "did {name} mention in the interview after {sport_event}",
    "did the report on {policy} single out", "did {company} feature in its new advert",
    "did the documentary about {venue} focus on",
    "did {official} refer to in the speech on {issue}",
)  # fmt: skip


def _question(rng: Rng, label: int) -> str:
    if rng.random() < 0.2:
        frame = rng.choice(_QUESTION_FRAMES)
        if label == 3:
            head = f"how many {rng.choice(_QUESTION_PLURALS)}"
        else:
            head = f"{rng.choice(('which', 'what'))} {rng.choice(_QUESTION_HEADS[label])}"
        return _finish(_fill(rng, f"{head} {frame}"), end="?")
    return _finish(_fill(rng, rng.choice(_QUESTION_TEMPLATES[label])), end="?")


# ---------------------------------------------------------------------------------------------
# negation: whether a statement contains a negated clause, (affirmed, negated)
# ---------------------------------------------------------------------------------------------

Vp = tuple[str, str, str, str]  # base, past, participle, object


@dataclass(frozen=True)
class _NegTopic:
    agents: tuple[str, ...]
    vps: tuple[Vp, ...]
    plurals: tuple[str, ...]
    plural_vps: tuple[Vp, ...]
    things: tuple[str, ...]
    adjs: tuple[str, ...]


# fmt: off
_NEG_TOPICS = (
    _NegTopic(
        agents=("the striker", "the coach", "the captain", "the goalkeeper", "{name}",
                "the No. 9"),
        vps=(("win", "won", "won", "the derby"), ("sign", "signed", "signed", "a new contract"),
             ("score", "scored", "scored", "a late goal"),
             ("miss", "missed", "missed", "the penalty"),
             ("celebrate", "celebrated", "celebrated", "the title"),
             ("attend", "attended", "attended", "the training session"),
             ("praise", "praised", "praised", "the referee"),
             ("finish", "finished", "finished", "the race")),
        plurals=("fans", "players", "supporters", "season ticket holders"),
        plural_vps=(("praise", "praised", "praised", "the referee"),
                    ("attend", "attended", "attended", "the match"),
                    ("celebrate", "celebrated", "celebrated", "the win"),
                    ("buy", "bought", "bought", "the new kit"),
                    ("expect", "expected", "expected", "a victory")),
        things=("the match", "the final", "the new kit", "the transfer", "the derby",
                "the season"),
        adjs=("expensive", "exciting", "worth watching", "popular with fans", "a surprise",
              "good news for the club", "close"),
    ),
    _NegTopic(
        agents=("{company}", "the chief engineer", "the developer", "{name}", "the support team"),
        vps=(("release", "released", "released", "the update"),
             ("fix", "fixed", "fixed", "the security flaw"),
             ("launch", "launched", "launched", "a cheaper phone"),
             ("delay", "delayed", "delayed", "the launch"),
             ("test", "tested", "tested", "the new chip"),
             ("replace", "replaced", "replaced", "the faulty battery"),
             ("answer", "answered", "answered", "the complaints")),
        plurals=("users", "reviewers", "engineers", "customers"),
        plural_vps=(("praise", "praised", "praised", "the new camera"),
                    ("report", "reported", "reported", "battery problems"),
                    ("notice", "noticed", "noticed", "the faster charging"),
                    ("install", "installed", "installed", "the update"),
                    ("buy", "bought", "bought", "the new laptop")),
        things=("the new phone", "the laptop", "the update", "the app", "the battery",
                "the website"),
        adjs=("fast", "reliable", "expensive", "easy to use", "popular with users",
              "worth the upgrade", "secure", "compatible with older models"),
    ),
    _NegTopic(
        agents=("the minister", "the mayor", "the senator", "the committee", "{name}",
                "the government"),
        vps=(("approve", "approved", "approved", "the budget"),
             ("support", "supported", "supported", "the housing bill"),
             ("sign", "signed", "signed", "the trade agreement"),
             ("mention", "mentioned", "mentioned", "the tax reform"),
             ("attend", "attended", "attended", "the debate"),
             ("announce", "announced", "announced", "a new election date"),
             ("win", "won", "won", "the vote"),
             ("answer", "answered", "answered", "the question about {issue}")),
        plurals=("voters", "protesters", "lawmakers", "officials"),
        plural_vps=(("back", "backed", "backed", "the reform"),
                    ("attend", "attended", "attended", "the rally"),
                    ("trust", "trusted", "trusted", "the polls"),
                    ("vote", "voted", "voted", "for the new mayor"),
                    ("criticise", "criticised", "criticised", "the budget")),
        things=("the bill", "the budget", "the reform", "the election", "the debate",
                "the new law"),
        adjs=("popular", "controversial", "fair", "ready for a vote", "expensive", "close",
              "legal", "easy to understand"),
    ),
    _NegTopic(
        agents=("the chef", "the baker", "the waiter", "the owner", "{name}", "the restaurant"),
        vps=(("serve", "served", "served", "the soup"),
             ("cook", "cooked", "cooked", "the lamb stew"),
             ("bake", "baked", "baked", "fresh bread"),
             ("change", "changed", "changed", "the menu"),
             ("recommend", "recommended", "recommended", "the risotto"),
             ("open", "opened", "opened", "a second branch"),
             ("raise", "raised", "raised", "the prices")),
        plurals=("diners", "critics", "guests", "customers"),
        plural_vps=(("enjoy", "enjoyed", "enjoyed", "the dessert"),
                    ("order", "ordered", "ordered", "the tasting menu"),
                    ("praise", "praised", "praised", "the new chef"),
                    ("like", "liked", "liked", "the spicy curry"),
                    ("finish", "finished", "finished", "their meals")),
        things=("the soup", "the pasta", "the dessert", "the curry", "the bread",
                "the lamb stew"),
        adjs=("fresh", "spicy", "expensive", "worth the wait", "delicious", "cheap",
              "popular with diners", "too salty"),
    ),
)
# fmt: on


_NEG_PREFIXES = (
    "according to reporters, ", "as expected, ", "nonetheless, ", "to everyone's surprise, ",
    "as the notes show, ", "as many people know, ", "in Norway, ", "in a notable change, ",
    "as the announcement made clear, ", "for the record, ", "honestly, ",
)  # fmt: skip
_NEG_SUFFIXES = (
    " after all", " in the end", " according to the notice", " despite the snow",
    " as far as anyone knows", " once again", " for now",
)  # fmt: skip
_CONNECTIVES = ("although", "even though", "while", "whereas")


def _two(rng: Rng, items: tuple[T, ...]) -> tuple[T, T]:
    a = rng.choice(items)
    b = rng.choice([x for x in items if x != a])
    return a, b


def _clause(rng: Rng, negated: bool, tp: _NegTopic) -> str:
    """One clause on topic ``tp``, grammatically negated or not."""
    kind = rng.choices(("agent", "plural", "thing", "there"), (4, 3, 3, 1))[0]
    if kind == "agent":
        s = rng.choice(tp.agents)
        (b, p, pp, o), (b2, p2, _, o2) = _two(rng, tp.vps)
        if negated:
            forms = (
                f"{s} did not {b} {o}", f"{s} didn't {b} {o}", f"{s} never {p} {o}",
                f"{s} has not {pp} {o}", f"{s} hasn't {pp} {o}", f"{s} has never {pp} {o}",
                f"{s} will not {b} {o}", f"{s} won't {b} {o}", f"{s} could not {b} {o}",
                f"{s} {p} {o} but did not {b2} {o2}", f"{s} {p} {o} but never {p2} {o2}",
                f"neither {s} nor {{name}} {p} {o}", f"{s} never managed to {b} {o}",
                f"{s} couldn't quite {b} {o}", f"{s} did not hesitate to {b} {o}",
            )  # fmt: skip
        else:
            adv = rng.choice(("finally", "quickly", "eventually", "already", "recently", "just"))
            forms = (
                f"{s} {p} {o}", f"{s} has {pp} {o}", f"{s} will {b} {o}", f"{s} {adv} {p} {o}",
                f"{s} {p} {o} and {p2} {o2}", f"{s} not only {p} {o} but also {p2} {o2}",
                f"both {s} and {{name}} {p} {o}", f"either {s} or {{name}} {p} {o}",
                f"{s} could {b} {o}", f"{s} knew how to {b} {o}",
                # implicitly negative, but no negation cue: affirmed
                f"{s} failed to {b} {o}", f"{s} refused to {b} {o}", f"{s} forgot to {b} {o}",
                f"{s} declined to {b} {o}",
            )  # fmt: skip
    elif kind == "plural":
        pl = rng.choice(tp.plurals)
        b, p, pp, o = rng.choice(tp.plural_vps)
        if negated:
            forms = (
                f"no {pl} {p} {o}", f"none of the {pl} {p} {o}", f"not many {pl} {p} {o}",
                f"the {pl} did not {b} {o}", f"the {pl} haven't {pp} {o}",
                f"nobody {p} {o}", f"no one {p} {o}", f"the {pl} never {p} {o}",
            )  # fmt: skip
        else:
            q = rng.choice(("many", "most", "several", "some", "a few", "almost all", "a lot of"))
            forms = (
                f"{q} {pl} {p} {o}", f"all of the {pl} {p} {o}", f"the {pl} have {pp} {o}",
                f"everyone {p} {o}", f"somebody {p} {o}", f"the {pl} {p} {o}",
                f"even the {pl} {p} {o}",
            )  # fmt: skip
    elif kind == "thing":
        t = rng.choice(tp.things)
        a, a2 = _two(rng, tp.adjs)
        if negated:
            forms = (
                f"{t} was not {a}", f"{t} wasn't {a}", f"{t} isn't {a}", f"{t} is not {a}",
                f"{t} is no longer {a}", f"{t} has never been {a}", f"{t} was neither {a} nor {a2}",
                f"nothing about {t} was {a}", f"{t} is not {a} anymore", f"{t} won't be {a}",
            )  # fmt: skip
        else:
            forms = (
                f"{t} was {a}", f"{t} is {a}", f"{t} has always been {a}", f"{t} seemed {a}",
                f"{t} is now {a}", f"{t} turned out to be {a}", f"everything about {t} was {a}",
                f"{t} was both {a} and {a2}", f"{t} will be {a}", f"{t} is known to be {a}",
            )  # fmt: skip
    else:
        t = rng.choice(tp.things)
        if negated:
            forms = (
                f"there were no complaints about {t}", f"there weren't any complaints about {t}",
                f"there was no delay with {t}", f"there was never any doubt about {t}",
            )  # fmt: skip
        else:
            forms = (
                f"there were complaints about {t}", f"there were several complaints about {t}",
                f"there was a delay with {t}", f"there was a lot of talk about {t}",
            )  # fmt: skip
    return rng.choice(forms)


def _negation(rng: Rng, label: int) -> str:
    negated = label == 1
    tp = rng.choice(_NEG_TOPICS)
    if rng.random() < 0.6:
        body = _clause(rng, negated, tp)
        r = rng.random()
        if r < 0.3:
            body = rng.choice(_NEG_PREFIXES) + body
        elif r < 0.5:
            body += rng.choice(_NEG_SUFFIXES)
    else:
        first_neg, second_neg = (
            rng.choice(((True, False), (False, True), (True, True))) if negated else (False, False)
        )
        c1, c2 = _clause(rng, first_neg, tp), _clause(rng, second_neg, tp)
        forms = [f"{rng.choice(_CONNECTIVES)} {c1}, {c2}", f"{c1}; however, {c2}"]
        if " but " not in c1:
            forms += [f"{c1}, but {c2}", f"{c1}, and {c2}"]
        body = rng.choice(forms)
    return _finish(_fill(rng, body))


# ---------------------------------------------------------------------------------------------
# emotion: (joy, anger, sadness, fear, surprise)
# ---------------------------------------------------------------------------------------------

_EMOTION_WORDS = (
    ("thrilled", "delighted", "overjoyed", "happy", "over the moon", "ecstatic", "glad",
     "cheerful", "elated", "joyful"),
    ("furious", "livid", "angry", "outraged", "fuming", "irritated", "annoyed", "enraged", "mad",
     "infuriated"),
    ("heartbroken", "devastated", "sad", "miserable", "gloomy", "down", "crushed",
     "grief-stricken", "depressed", "unhappy"),
    ("terrified", "scared", "afraid", "anxious", "frightened", "nervous", "panicked",
     "worried sick", "petrified", "alarmed"),
    ("astonished", "stunned", "amazed", "surprised", "taken aback", "caught off guard",
     "startled", "dumbfounded", "flabbergasted", "speechless"),
)  # fmt: skip
_EMOTION_IMPLICIT = (
    ("{s} couldn't stop smiling", "{s} danced around the kitchen",
     "{s} laughed and hugged everyone nearby", "{s} cheered until {poss} voice gave out",
     "{s} grinned from ear to ear all evening", "{s} sang all the way home"),
    ("{s} slammed the door so hard the windows shook", "{s} shouted at the screen",
     "{s} wanted to throw the phone across the room", "{poss} face went red with rage",
     "{s} stormed out and refused to speak to anyone", "{s} banged {poss} fist on the table"),
    ("{s} cried for most of the night", "{s} stared at the empty chair for hours",
     "{s} couldn't eat for days", "tears ran down {poss} face",
     "{s} sat alone in the dark and didn't want to talk", "{s} felt a heavy ache of loss"),
    ("{poss} hands were shaking", "{s} kept checking the locks all night",
     "{poss} heart was pounding", "{s} froze and held {poss} breath",
     "{s} couldn't sleep, imagining the worst", "{s} hid behind the sofa, trembling"),
    ("{s} had to read the message twice", "{poss} jaw dropped",
     "{s} blinked and asked if it was a joke", "{s} never saw it coming",
     "{s} just stood there with {poss} mouth open", "{s} did a double take"),
)  # fmt: skip
_EMOTION_TRIGGERS_NEUTRAL = (
    "when {team} scored in the last minute", "when the final whistle blew",
    "as the election results came in", "when the minister announced the new tax",
    "when my new phone finally arrived", "when the chef came out to our table",
    "when I opened the letter from the council", "when the update restarted my laptop",
    "when the referee checked the video", "when the waiter brought the bill",
    "as the vote count was read out", "when I saw the headline about {company}",
    "when {team} announced their new coach", "when the lights went out in the stadium",
    "when my phone buzzed at midnight", "when the restaurant called about our booking",
    "when {official} walked into the room", "when the results of the review were published",
)  # fmt: skip
_EMOTION_TRIGGERS = (
    ("when {team} won the cup", "when I got the job at {company}",
     "when our bakery won the local prize", "when my sister announced her engagement"),
    ("when the council raised our rent again", "when the airline lost my luggage",
     "when the referee ignored a clear foul", "when the shop refused to refund the broken laptop"),
    ("after the bakery on our street closed for good", "when our old dog died",
     "when {team} were relegated", "when my best friend moved to {city}"),
    ("when the plane started shaking", "when I heard footsteps behind me in the dark",
     "as the flood water rose", "when the smoke alarm went off at night"),
    ("when a stranger paid for our dinner", "when the quiet intern won the election",
     "when the old laptop suddenly turned back on", "when my brother showed up unannounced"),
)  # fmt: skip
# subject, past 'be', possessive, pronoun
_EMOTION_SUBJECTS = (
    ("I", "was", "my", "I"), ("I", "was", "my", "I"), ("we", "were", "our", "we"),
    ("my sister", "was", "her", "she"), ("my brother", "was", "his", "he"),
    ("my parents", "were", "their", "they"), ("the fans", "were", "their", "they"),
    ("Maria", "was", "her", "she"), ("James", "was", "his", "he"), ("Aisha", "was", "her", "she"),
    ("Kenji", "was", "his", "he"), ("our coach", "was", "his", "he"),
)  # fmt: skip


def _emotion(rng: Rng, label: int) -> str:
    s, be, poss, pron = rng.choice(_EMOTION_SUBJECTS)
    trig = rng.choice(_EMOTION_TRIGGERS_NEUTRAL + _EMOTION_TRIGGERS[label])
    word = rng.choice(_EMOTION_WORDS[label])
    intens = "" if " " in word else rng.choice(("", "", "so", "really", "absolutely", "deeply"))
    if intens == "deeply" and label not in (2, 3):
        intens = "truly"
    other = rng.choice([w for i, ws in enumerate(_EMOTION_WORDS) if i != label for w in ws])
    implicit = rng.choice(_EMOTION_IMPLICIT[label]).replace("{s}", s).replace("{poss}", poss)
    kind = rng.choices(("word", "lead", "implicit", "two", "mixed"), (3, 2, 3, 2, 2))[0]
    if kind == "word":
        body = f"{s} {be} {intens} {word} {trig}"
    elif kind == "lead":
        body = f"{trig}, {s} felt {intens} {word}"
    elif kind == "implicit":
        body = f"{trig}, {implicit}"
    elif kind == "two":
        event = re.sub(r"^(when|after|as) ", "", trig)
        second = rng.choice((f"{s} {be} {intens} {word}", implicit))
        body = f"{_finish(event)} {_finish(second)}"
    else:
        body = rng.choice(
            (
                f"{s} expected to be {other} {trig}, but {pron} {be} actually {word}",
                f"at first {s} {be} {other}, but {trig} {pron} {be} {word}",
                f"{trig}, {s} {be}n't {other} at all; {pron} {be} {word}",
            )
        )
    return _finish(_fill(rng, body))


# ---------------------------------------------------------------------------------------------
# formality: (formal, informal)
# ---------------------------------------------------------------------------------------------

_FORMAL = (
    "I would be grateful if you could send me the {doc} by {weekday}.",
    "Please find attached the {doc} regarding {topic_obj}.",
    "We regret to inform you that {venue} will be closed on {weekday} for maintenance.",
    "Could you kindly confirm whether the {doc_sg} has been approved?",
    "I am writing to enquire about {topic_obj}.",
    "Thank you for your assistance with {task}; it is greatly appreciated.",
    "We would be delighted if you could attend {event_inv} on {weekday} evening.",
    "I apologise for the delay in responding to your message regarding {topic_obj}.",
    "The committee has reviewed the {doc} and will respond in due course.",
    "Should you require any further information about {topic_obj}, please do not hesitate to contact me.",
    "Kindly ensure that the {doc_sg} is submitted before the deadline on {weekday}.",
    "Please accept our sincere apologies for the inconvenience caused by {problem}.",
    "I am pleased to inform you that your table has been confirmed for {weekday}.",
    "I should be most obliged if you would forward the {doc} to the finance department.",
    "We wish to notify all residents that the vote on {policy} has been postponed.",
    "I am delighted to report that {team} won {sport_event} on {weekday}.",
    "May I request a brief meeting to discuss {topic_obj} before {weekday}?",
    "Further to our conversation, I enclose the {doc} for your consideration.",
    "We would appreciate your feedback on the new {company} {gadget} at your convenience.",
    "Regrettably, I shall be unable to attend {event_inv} due to a prior commitment.",
    "Please send the {doc} by {weekday}.",
    "The meeting about {topic_obj} has been moved to {weekday}.",
    "Thank you for the update on {topic_obj}.",
    "The {doc_sg} is attached for your review.",
    "Could you send me the {doc} before {weekday}?",
    "Please let me know if you have any questions about {topic_obj}.",
)
# One informal device turns an otherwise formal message informal.
_CONTRACTIONS = (
    ("I am ", "I'm "), ("I would ", "I'd "), ("do not ", "don't "), ("It is ", "It's "),
    ("has been ", "'s been "), ("shall be unable", "won't be able"), ("We would ", "We'd "),
    ("is attached", "'s attached"),
)  # fmt: skip
_TAGS = (" lol", " thx!", " asap", " haha", " tbh", " pls")
_LEADS = ("btw, ", "ok so ", "quick one: ", "fyi ", "soo ")


def _informalise(rng: Rng, body: str) -> str:
    kind = rng.choice(("contraction", "tag", "lead"))
    if kind == "contraction":
        for formal, casual in _CONTRACTIONS:
            if formal in body:
                return body.replace(formal, casual, 1).replace(" 's", "'s")
        kind = "tag"
    if kind == "tag":
        return body.rstrip(".") + rng.choice(_TAGS)
    return rng.choice(_LEADS) + body[0].lower() + body[1:]


_INFORMAL = (
    "hey, can you send me the {doc} by {weekday}?",
    "here's the {doc} for {topic_obj}, lmk if anything's off",
    "ugh, {venue}'s shut on {weekday} again, so annoying",
    "did the {doc_sg} get approved or nah?",
    "so what's the deal with {topic_obj}?",
    "thanks a ton for sorting out {task}!!",
    "wanna come to {event_inv} on {weekday}? gonna be fun",
    "sorry for the super late reply about {topic_obj}, been swamped",
    "the committee's gonna hate the {doc} lol",
    "if u need anything else about {topic_obj} just shout",
    "don't forget to send the {doc} before {weekday}, ok?",
    "soz about {problem}, total mess",
    "guess what, your table's booked for {weekday}!",
    "can u forward the {doc} to finance? cheers",
    "heads up, the vote on {policy} got pushed back",
    "omg {team} actually won {sport_event}, can't believe it",
    "gonna grab food at {venue} later, u in?",
    "got a sec to chat about {topic_obj} before {weekday}?",
    "btw what do you reckon about the new {company} {gadget}?",
    "can't make it to {event_inv}, something came up, sorry!",
    "Thanks so much for sorting out {task}, you're a star!",
)


# Openers and closers; "Hi {first}," and "Thanks" occur in both registers.
_FORMAL_OPEN = ("", "", "Dear {first},", "Dear Ms {last},", "Dear Mr {last},", "Good afternoon,",
                "Hi {first},", "To whom it may concern,")  # fmt: skip
_FORMAL_CLOSE = ("", "", "Kind regards.", "Yours sincerely.", "With best regards.", "Thanks.",
                 "Respectfully yours.")  # fmt: skip
_INFORMAL_OPEN = ("", "", "hey {first},", "yo,", "hiya!", "Hi {first},", "morning!",
                  "{first}!!")  # fmt: skip
_INFORMAL_CLOSE = ("", "", "cheers", "ta", "xx", "thx!", "Thanks!", "see ya", ":)")  # fmt: skip


def _formality(rng: Rng, label: int) -> str:
    if label == 0:
        opener, closer = rng.choice(_FORMAL_OPEN), rng.choice(_FORMAL_CLOSE)
        body = _finish(_fill(rng, rng.choice(_FORMAL)))
    else:
        opener, closer = rng.choice(_INFORMAL_OPEN), rng.choice(_INFORMAL_CLOSE)
        if rng.random() < 0.3:
            body = _informalise(rng, _finish(_fill(rng, rng.choice(_FORMAL))))
        else:
            body = _finish(_fill(rng, rng.choice(_INFORMAL)), end="")
        if body.lower().startswith(("hey", "yo", "hiya")):
            opener = ""
        if opener or rng.random() < 0.5:
            body = body[0].lower() + body[1:]
    return " ".join(p for p in (_fill(rng, opener), body, closer) if p)


# ---------------------------------------------------------------------------------------------
# registry and assembly
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinSpec:
    """A builtin dataset: its label space, what it is, and its sentence generator."""

    name: str
    label_names: tuple[str, ...]
    description: str
    generate: Callable[[Rng, int], str]


BUILTINS: dict[str, BuiltinSpec] = {
    s.name: s
    for s in (
        BuiltinSpec(
            "synthetic_sentiment",
            ("negative", "positive"),
            "product, film, restaurant and event review sentences",
            _sentiment,
        ),
        BuiltinSpec(
            "synthetic_topic",
            ("sports", "technology", "politics", "food"),
            "news sentences, often carrying sentiment words and cross-topic distractors",
            _topic,
        ),
        BuiltinSpec(
            "synthetic_question",
            ("person", "place", "time", "number"),
            "questions about sports, tech, politics and food, by the kind of answer they ask for",
            _question,
        ),
        BuiltinSpec(
            "synthetic_negation",
            ("affirmed", "negated"),
            "statements on the news topics; negated when any clause is negated (not, n't, never, "
            "no, none, nobody, neither/nor, no longer, nothing)",
            _negation,
        ),
        BuiltinSpec(
            "synthetic_emotion",
            ("joy", "anger", "sadness", "fear", "surprise"),
            "first- and third-person accounts of an emotion, named or shown by behaviour",
            _emotion,
        ),
        BuiltinSpec(
            "synthetic_formality",
            ("formal", "informal"),
            "workplace and everyday messages; informal when they use any informal device "
            "(slang, abbreviations, contractions, emoticons)",
            _formality,
        ),
    )
}


def builtin_names() -> list[str]:
    """Names of the builtin datasets, sorted."""
    return sorted(BUILTINS)


def _normalise(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower()).strip()


def generate_builtin(name: str, sizes: tuple[int, int, int] = SIZES) -> DatasetSplits:
    """Generate builtin dataset ``name`` with label-balanced splits of the given sizes.

    No sentence (compared case- and punctuation-insensitively) appears twice, within or across
    splits.
    """
    spec = BUILTINS[name]
    n_labels = len(spec.label_names)
    if any(s % n_labels for s in sizes):
        raise ValueError(f"split sizes {sizes} must be divisible by {n_labels} labels")
    per_label = [s // n_labels for s in sizes]
    need = sum(per_label)
    # The stream is keyed by the name without its ``synthetic_`` prefix (the datasets' first
    # names), so the content did not change when they were renamed.
    key = name.removeprefix("synthetic_")
    rng = random.Random(zlib.crc32(f"mergesec-builtin/{key}".encode()))
    owner: dict[str, int] = {}
    pools: list[list[str]] = [[] for _ in range(n_labels)]
    attempts = 0
    # Round-robin over labels so that every label draws from the generator stream alike.
    while any(len(p) < need for p in pools):
        for label in range(n_labels):
            if len(pools[label]) >= need:
                continue
            text = spec.generate(rng, label)
            key = _normalise(text)
            attempts += 1
            if key in owner:
                if owner[key] != label:
                    raise RuntimeError(f"builtin {name}: {text!r} generated for two labels")
                if attempts > 40 * need * n_labels:
                    raise RuntimeError(f"builtin {name}: too few distinct sentences")
                continue
            owner[key] = label
            pools[label].append(text)
    splits: list[list[Example]] = [[], [], []]
    for label, pool in enumerate(pools):
        start = 0
        for i, size in enumerate(per_label):
            splits[i].extend(Example(t, label) for t in pool[start : start + size])
            start += size
    for split in splits:
        rng.shuffle(split)
    return DatasetSplits(
        name=f"builtin:{name}",
        label_names=spec.label_names,
        train=tuple(splits[0]),
        validation=tuple(splits[1]),
        test=tuple(splits[2]),
    )


@cache
def load_builtin(name: str) -> DatasetSplits:
    """The builtin dataset ``name`` (generated once per process, then cached)."""
    if name not in BUILTINS:
        raise ValueError(f"unknown builtin dataset {name!r}; known: {', '.join(builtin_names())}")
    return generate_builtin(name)
