"""Questions about a scene and their short answers, in several phrasings.

Kinds: the shape of an object (named by its colour or its position, or the only one), the
colour of an object (named by its kind or its position), the count, the position of an object
(named by its kind or its colour) and a one-sentence description. Phrasings come with the
spelling variants a user may type (colour/color) and, at random, a lower-case first letter or
no final punctuation. One phrasing of each kind of question and way of naming the shape is kept
out of training (`train=False`): the eval split asks it too, so that a wording the model never
saw is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mvlm_compile.tinytask.scenes import SLOT_ORDER, Scene, Shape

KINDS = ("shape", "colour", "count", "position", "describe")
NUMBERS = ("One", "Two", "Three")
# How a slot is said inside a question and as an answer.
WHERE = {"top": "at the top", "left": "on the left", "right": "on the right", "bottom": "at the bottom"}
SPELLINGS = ("colour", "color")


@dataclass(frozen=True)
class Template:
    kind: str
    refer: str  # how the asked-about shape is named: "kind", "colour", "slot", "only" or "" (about the scene)
    text: str  # with {shape}, {colour}, {where}, {c} (colour/color) fields
    train: bool = True


TEMPLATES: tuple[Template, ...] = (
    # shape of an object
    Template("shape", "only", "What shape is in the image?"),
    Template("shape", "only", "What shape do you see?"),
    Template("shape", "only", "Which shape is shown?"),
    Template("shape", "only", "What is this shape?"),
    Template("shape", "only", "What shape is this?"),
    Template("shape", "only", "Name the shape in the picture.", train=False),
    Template("shape", "colour", "What shape is the {colour} one?"),
    Template("shape", "colour", "Which shape is {colour}?"),
    Template("shape", "colour", "What is the {colour} shape?"),
    Template("shape", "colour", "What shape is the {colour} object?"),
    Template("shape", "colour", "Which shape has the {colour} {c}?"),
    Template("shape", "colour", "What kind of shape is the {colour} object?", train=False),
    Template("shape", "slot", "What shape is {where}?"),
    Template("shape", "slot", "Which shape is {where}?"),
    Template("shape", "slot", "What is the shape {where}?"),
    Template("shape", "slot", "Which object is {where}?"),
    Template("shape", "slot", "What do you see {where}?"),
    Template("shape", "slot", "What kind of shape do you see {where}?", train=False),
    # colour of an object
    Template("colour", "kind", "What {c} is the {shape}?"),
    Template("colour", "kind", "What is the {c} of the {shape}?"),
    Template("colour", "kind", "Which {c} is the {shape}?"),
    Template("colour", "kind", "What {c} does the {shape} have?"),
    Template("colour", "kind", "What {c} is the {shape} in the image?"),
    Template("colour", "kind", "Tell me the {c} of the {shape}.", train=False),
    Template("colour", "slot", "What {c} is the shape {where}?"),
    Template("colour", "slot", "What is the {c} of the shape {where}?"),
    Template("colour", "slot", "What {c} is the object {where}?"),
    Template("colour", "slot", "Which {c} is the object {where}?", train=False),
    Template("colour", "only", "What {c} is the shape?"),
    Template("colour", "only", "What is the {c} of the shape in the image?"),
    Template("colour", "only", "Which {c} is the shape?"),
    # count
    Template("count", "", "How many shapes are there?"),
    Template("count", "", "How many shapes are in the image?"),
    Template("count", "", "How many objects can you see?"),
    Template("count", "", "Count the shapes."),
    Template("count", "", "How many shapes do you see?"),
    Template("count", "", "How many objects are in the picture?"),
    Template("count", "", "What is the number of shapes in the picture?", train=False),
    # position of an object
    Template("position", "kind", "Where is the {shape}?"),
    Template("position", "kind", "Where is the {shape} located?"),
    Template("position", "kind", "In which part of the image is the {shape}?"),
    Template("position", "kind", "Where can you see the {shape}?"),
    Template("position", "kind", "Where is the {shape} in the picture?"),
    Template("position", "kind", "What is the position of the {shape}?", train=False),
    Template("position", "colour", "Where is the {colour} shape?"),
    Template("position", "colour", "Where is the {colour} object?"),
    Template("position", "colour", "Where is the {colour} one?"),
    Template("position", "colour", "In which part of the image is the {colour} shape?"),
    Template("position", "colour", "Where can you find the {colour} shape?", train=False),
    # description
    Template("describe", "", "Describe the image in one sentence."),
    Template("describe", "", "What is in the image?"),
    Template("describe", "", "What do you see?"),
    Template("describe", "", "Describe this picture briefly."),
    Template("describe", "", "What does the image show?"),
    Template("describe", "", "Describe the image."),
    Template("describe", "", "Give a one-sentence description of the image.", train=False),
)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str
    template: int  # index in TEMPLATES
    target: str  # the kind of the shape asked about ("" for count and description)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_phrase(shape: Shape) -> str:
    return f"{article(shape.colour)} {shape.colour} {shape.kind} {WHERE[shape.slot]}"


def describe(scene: Scene) -> str:
    """'A red circle on the left, a blue star at the top and a green square on the right.'"""
    parts = [shape_phrase(s) for s in scene.in_reading_order()]
    sentence = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return sentence[0].upper() + sentence[1:] + "."


def answer(kind: str, scene: Scene, target: Shape | None) -> str:
    if kind == "shape":
        return f"{article(target.kind).capitalize()} {target.kind}."
    if kind == "colour":
        return f"{target.colour.capitalize()}."
    if kind == "count":
        return f"{NUMBERS[len(scene.shapes) - 1]}."
    if kind == "position":
        return f"{WHERE[target.slot][0].upper()}{WHERE[target.slot][1:]}."
    if kind == "describe":
        return describe(scene)
    raise ValueError(f"unknown question kind {kind!r}")


def usable(template: Template, scene: Scene) -> bool:
    """'only' templates ask about the single shape of a one-shape scene; the others suit any scene."""
    return template.refer != "only" or len(scene.shapes) == 1


def _casual(rng: np.random.Generator, text: str) -> str:
    """How people type: sometimes a lower-case first letter, sometimes no final punctuation."""
    if rng.random() < 0.1:
        text = text[0].lower() + text[1:]
    if rng.random() < 0.1:
        text = text.rstrip("?.")
    return text


def make_qa(rng: np.random.Generator, scene: Scene, kind: str, target: Shape | None = None, train: bool = True) -> QA:
    """A question of `kind` about `scene` (about `target` when the kind names a shape), phrased at
    random among the templates allowed for the split (`train`: only training phrasings)."""
    choices = [i for i, t in enumerate(TEMPLATES) if t.kind == kind and usable(t, scene) and (t.train or not train)]
    index = choices[int(rng.integers(len(choices)))]
    template = TEMPLATES[index]
    if template.refer in ("kind", "colour", "slot", "only") and target is None:
        target = scene.shapes[int(rng.integers(len(scene.shapes)))]
    fields = {"c": SPELLINGS[int(rng.integers(2))]}
    if target is not None:
        fields.update(shape=target.kind, colour=target.colour, where=WHERE[target.slot])
    question = _casual(rng, template.text.format(**fields))
    return QA(question, answer(kind, scene, target), kind, index, target.kind if target else "")


def all_sentences() -> list[str]:
    """Every training phrasing and every answer of the task, for training the tokenizer (the
    held-out phrasings are tokenized like any user's own wording)."""
    from mvlm_compile.tinytask.scenes import COLOURS, SHAPES

    out = []
    for t in (t for t in TEMPLATES if t.train):
        for shape in SHAPES:
            for colour in COLOURS:
                for slot in SLOT_ORDER:
                    for c in SPELLINGS:
                        out.append(t.text.format(shape=shape, colour=colour, where=WHERE[slot], c=c))
    out += [f"{n}." for n in NUMBERS]
    out += [f"{c.capitalize()}." for c in COLOURS] + [f"{article(s).capitalize()} {s}." for s in SHAPES]
    out += [f"{WHERE[s][0].upper()}{WHERE[s][1:]}." for s in SLOT_ORDER]
    out += [f"{article(c).capitalize()} {c} {s} {WHERE[p]}" for s in SHAPES for c in COLOURS for p in SLOT_ORDER]
    return list(dict.fromkeys(out))
