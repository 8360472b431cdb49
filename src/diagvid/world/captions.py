"""Caption grammar of the toy world: spec -> caption, and caption -> what the prompt asks for.

Grammar (words separated by spaces, case and a final full stop ignored):

    caption  := clause ("and" clause)*
    clause   := ["a"] [colour] shape [verb] [direction] [speed]
    verb     := "moves" | "move"
    direction:= one of DIRECTIONS, or a vertical word followed by a horizontal one ("up left")

A clause without motion words takes the motion of the next clause, so "a blue circle and a green
triangle move right slowly" gives both objects the same direction and speed.
"""

from dataclasses import dataclass

from diagvid.world.render import COLOURS, DIRECTIONS, SHAPES, SPEEDS, ClipSpec

# the word each speed class is written with, and every word accepted for it
SPEED_WORDS: dict[str, str] = {"slow": "slowly", "fast": "fast"}
_SPEED_OF_WORD: dict[str, str] = {"slowly": "slow", "slow": "slow", "fast": "fast", "quickly": "fast"}
_VERBS = ("moves", "move")
_ARTICLE = "a"
_AND = "and"

VOCABULARY: tuple[str, ...] = (
    _ARTICLE,
    _AND,
    *_VERBS,
    *COLOURS,
    *SHAPES,
    *DIRECTIONS,
    *_SPEED_OF_WORD,
)
"""Every word the grammar accepts, in a fixed order (the word-level tokenizer is built on it)."""

assert set(_SPEED_OF_WORD.values()) == set(SPEEDS), "every speed class needs caption words"

OPPOSITE: dict[str, str] = {
    word: next(other for other, (ox, oy) in DIRECTIONS.items() if (ox, oy) == (-dx, -dy))
    for word, (dx, dy) in DIRECTIONS.items()
}
"""Each direction word and its reverse ("up-left" -> "down-right")."""


def reversed_caption(caption: str) -> str:
    """The caption with every direction word reversed, so each object is asked to move the other way along
    the same line ("a red circle moves up left" -> "a red circle moves down right")."""
    return " ".join(OPPOSITE.get(word, word) for word in caption.split())


@dataclass(frozen=True)
class PromptObject:
    """What a prompt asks of one object; None where the prompt does not say."""

    colour: str | None = None
    shape: str | None = None
    direction: str | None = None
    speed: str | None = None


def _words(obj) -> str:
    return f"a {obj.colour} {obj.shape}"


def _motion(obj) -> str:
    return f"{obj.direction} {SPEED_WORDS[obj.speed]}"


def caption(spec: ClipSpec) -> str:
    """Caption of a clip, e.g. "a red square moves up-left fast"."""
    objects = spec.objects
    if len(objects) == 1:
        return f"{_words(objects[0])} moves {_motion(objects[0])}"
    if len({(o.direction, o.speed) for o in objects}) == 1:
        return f"{' and '.join(_words(o) for o in objects)} move {_motion(objects[0])}"
    return " and ".join(f"{_words(o)} moves {_motion(o)}" for o in objects)


def _parse_clause(words: list[str], text: str) -> tuple[dict, bool]:
    """Slots of one clause and whether it had motion words or a verb."""
    # each slot may be filled once and only after the slots before it, which fixes the word order
    order = ("article", "colour", "shape", "verb", "direction", "speed")
    slots: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == _ARTICLE:
            slot, value = "article", w
        elif w in COLOURS:
            slot, value = "colour", w
        elif w in SHAPES:
            slot, value = "shape", w
        elif w in _VERBS:
            slot, value = "verb", w
        elif w in DIRECTIONS:
            slot, value = "direction", w
            nxt = words[i + 1] if i + 1 < len(words) else None
            if w in ("up", "down") and nxt in ("left", "right"):
                value = f"{w}-{nxt}"
                i += 1
        else:
            slot, value = "speed", _SPEED_OF_WORD[w]
        if slot in slots:
            raise ValueError(f"{text!r}: one object has two {slot} words ({slots[slot]!r} and {w!r})")
        later = [s for s in order[order.index(slot) + 1 :] if s in slots]
        if later:
            raise ValueError(f"{text!r}: the {slot} word {w!r} must come before the {later[0]} word")
        slots[slot] = value
        i += 1
    if "colour" not in slots and "shape" not in slots:
        raise ValueError(f"{text!r}: each object needs a colour or a shape ({', '.join(SHAPES)})")
    has_motion = any(s in slots for s in ("verb", "direction", "speed"))
    return slots, has_motion


def parse_caption(text: str) -> list[PromptObject]:
    """What a caption asks for, one PromptObject per object; raises ValueError on unknown words."""
    words = text.lower().strip().rstrip(".").split()
    if not words:
        raise ValueError("empty caption; write e.g. 'a red circle moves left fast'")
    for w in words:
        if w not in VOCABULARY:
            raise ValueError(
                f"unknown word {w!r} in caption {text!r}; allowed words: {', '.join(VOCABULARY)}"
            )
    clauses: list[list[str]] = [[]]
    for w in words:
        if w == _AND:
            clauses.append([])
        else:
            clauses[-1].append(w)
    if any(not c for c in clauses):
        raise ValueError(f"{text!r}: 'and' must join two objects, e.g. 'a red circle and a blue square'")
    parsed = [_parse_clause(c, text) for c in clauses]
    objects: list[PromptObject] = []
    for k, (slots, has_motion) in enumerate(parsed):
        if not has_motion:
            # "a X and a Y move right": X shares the motion of the next clause that has one
            donor = next((s for s, m in parsed[k + 1 :] if m), {})
            slots = {**slots, **{key: donor[key] for key in ("direction", "speed") if key in donor}}
        objects.append(
            PromptObject(slots.get("colour"), slots.get("shape"), slots.get("direction"), slots.get("speed"))
        )
    return objects
