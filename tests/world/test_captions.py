"""Caption grammar: round trips, user prompts, and errors that name the bad word."""

import pytest

from diagvid.world import VOCABULARY, PromptObject, caption, parse_caption, sample_spec


def test_caption_parses_back_to_the_spec():
    for seed in range(300):
        spec = sample_spec(seed, 1, p_two=0.5)
        parsed = parse_caption(caption(spec))
        expected = [PromptObject(o.colour, o.shape, o.direction, o.speed) for o in spec.objects]
        assert parsed == expected, caption(spec)


def test_examples():
    assert caption(sample_spec(0, 1, p_two=0.0)).startswith("a ")
    assert parse_caption("a red square moves up-left fast") == [
        PromptObject("red", "square", "up-left", "fast")
    ]
    assert parse_caption("a blue circle and a green triangle move right slowly") == [
        PromptObject("blue", "circle", "right", "slow"),
        PromptObject("green", "triangle", "right", "slow"),
    ]
    assert parse_caption("a cyan circle moves left fast and a red square moves down slowly") == [
        PromptObject("cyan", "circle", "left", "fast"),
        PromptObject("red", "square", "down", "slow"),
    ]
    # what a user might type: capitals, a full stop, "up left" in two words, no speed
    assert parse_caption("A red circle moves up left.") == [PromptObject("red", "circle", "up-left", None)]
    assert parse_caption("a circle") == [PromptObject(None, "circle", None, None)]


def test_unknown_word_names_it_and_the_allowed_words():
    with pytest.raises(ValueError, match="unknown word 'purple'") as err:
        parse_caption("a purple circle moves left")
    assert "magenta" in str(err.value) and "triangle" in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a circle red moves left",
        "a red circle moves left right",
        "a red blue circle",
        "and a red circle",
        "moves left",
    ],
)
def test_malformed_captions_raise(bad):
    with pytest.raises(ValueError):
        parse_caption(bad)


def test_vocabulary_covers_every_caption():
    assert len(VOCABULARY) == len(set(VOCABULARY))
    words = {w for seed in range(200) for w in caption(sample_spec(seed, 1, p_two=0.5)).split()}
    assert words <= set(VOCABULARY)
