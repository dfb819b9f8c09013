"""RD-MLDG on the micro world: answers, chains, teacher, micro MLLM, MTCT, SARR, DG, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from cdfsl.data.micro_world import COLOURS, SHAPES
from cdfsl.errors import CdfslError, WeightsError
from cdfsl.reasoning.answers import TAGS, conclusion_text, missing_tags, normalise, parse_class
from cdfsl.reasoning.chains import (
    Chain,
    ChainStore,
    chain_text,
    import_chains,
    read_chains,
    validate_chains,
)
from cdfsl.reasoning.dg import average, markdown_table, score_answers
from cdfsl.reasoning.micro_dg import (
    MicroDGDomain,
    TemplateTeacher,
    list_dg_domains,
    micro_dg_split,
)
from cdfsl.reasoning.micro_mllm import MicroMLLM, MicroMLLMConfig, WordVocabulary
from cdfsl.reasoning.model import GenerativeVLM, ImageInputs, require_reason_extra
from cdfsl.reasoning.mtct import MTCTModule, ReasoningExamples, TrainConfig, mtct_loss
from cdfsl.reasoning.prompts import label_prompt, reason_prompt, teacher_prompt
from cdfsl.reasoning.sarr import SARRConfig, SARRRunner, replace_chains, select_self_chains

CLASSES = ["circle", "red circle", "alarm clock", "dog"]
DG_CLASSES = list(SHAPES)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as the micro recipe runs: a shared 2-core machine spins with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def good_chain(name: str) -> str:
    return chain_text({t: f"text of {t.lower()}" for t in TAGS[:-1]} | {"CONCLUSION": name})


# -- answers -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("dog", 3),  # exact
        ("  dog\n", 3),  # exact after stripping
        ("Dog.", 3),  # normalised: case, punctuation
        ("The alarm_clock!", 2),  # normalised: article, underscore
        ("alarm-clock", 2),  # normalised: hyphen
        ("the class of this image is dog", 3),  # mention
        ("it is a red circle", 1),  # the longer name wins over "circle" inside it
        ("a circle, not a dog", None),  # two classes: ambiguous
        ("red circle or circle", None),  # a second, separate "circle": ambiguous
        ("hotdog", None),  # no whole-word match
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_parse_class(answer, expected):
    assert parse_class(answer, CLASSES) == expected


def test_normalise_drops_only_a_leading_article():
    assert normalise("The  Theatre-Hall.") == "theatre hall"
    assert normalise("a") == "a"


def test_conclusion_text_takes_the_last_and_tolerates_a_cut_end():
    assert conclusion_text(good_chain("dog")) == "dog"
    assert conclusion_text("<CONCLUSION> cat </CONCLUSION> <CONCLUSION> dog") == "dog"
    assert conclusion_text("<REASONING> x </REASONING>") is None


def test_missing_tags():
    assert missing_tags(good_chain("dog")) == []
    no_caption = good_chain("dog").replace("<CAPTION>", "")
    assert missing_tags(no_caption) == ["CAPTION"]
    unclosed = good_chain("dog").replace("</CONCLUSION>", "")
    assert missing_tags(unclosed) == ["CONCLUSION"]
    swapped = (
        "<SUMMARY> s </SUMMARY> <REASONING> r </REASONING> <CAPTION> c </CAPTION> "
        "<REFLECTION> f </REFLECTION> <CONCLUSION> dog </CONCLUSION>"
    )
    assert missing_tags(swapped) == ["REASONING"]  # found only before CAPTION: out of order


# -- chains --------------------------------------------------------------------------------------
def test_validation_counts_every_reason_and_keeps_the_rest(tmp_path: Path):
    labels = {"a": 3, "b": 0, "c": 2, "d": 3}
    rows = [
        {"image_id": "a", "chain": good_chain("dog"), "source": "x"},
        {"image_id": "b", "chain": good_chain("circle").replace("</REFLECTION>", "")},
        {"image_id": "c", "chain": good_chain("dog")},  # wrong class
        {"image_id": "d", "chain": good_chain("a cat")},  # names no class
        {"image_id": "zzz", "chain": good_chain("dog")},
        {"image_id": "a", "chain": good_chain("dog")},  # duplicate
        {"chain": "no id"},
    ]
    path = tmp_path / "chains.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    report = import_chains(path, labels, CLASSES, source="gpt-4o")
    assert [c.image_id for c in report.kept] == ["a"]
    assert report.kept[0].source == "gpt-4o"
    assert report.counts == {
        "missing tag": 1,
        "wrong conclusion": 2,
        "unknown image id": 1,
        "duplicate image id": 1,
        "malformed row": 2,
    }
    text = report.format(limit=10)
    assert "1 kept, 7 rejected" in text
    assert "'zzz': unknown image id" in text
    assert "lacks or misorders <REFLECTION>" in text
    assert "conclusion names 'dog', the image is 'alarm clock'" in text
    assert f"{path}:8" in text  # the broken JSON line is named
    assert report.summary()["rejected_by_reason"]["wrong conclusion"] == 2


def test_chain_store_round_trip_and_errors(tmp_path: Path):
    store = ChainStore(tmp_path / "sub" / "c.jsonl")
    chains = [Chain("x/1", good_chain("dog"), "template", 0), Chain("x/2", "t", "self", 2)]
    store.write(chains)
    assert store.read() == chains
    assert not list(tmp_path.glob("sub/*.tmp"))
    store.path.write_text(store.path.read_text() + '{"image_id": 3}\n')
    with pytest.raises(CdfslError, match=r"c.jsonl:3 is not a chain row"):
        store.read()
    with pytest.raises(CdfslError, match="does not exist"):
        read_chains(tmp_path / "missing.jsonl")


def test_prompts_are_package_data():
    assert label_prompt() == "What is the class of this image? Answer with the class name."
    assert all(f"<{t}>" in reason_prompt() for t in TAGS)
    told = teacher_prompt(["cat", "dog"], "dog")  # cdfsl's earlier request, still available
    assert '"dog"' in told and "cat, dog" in told and "<CONCLUSION> dog </CONCLUSION>" in told


def test_teacher_is_not_told_the_class_by_default():
    """The default request is the same for an image of every class: it cannot name the class
    (the spec's filter on the CONCLUSION then rejects the teacher's wrong answers)."""
    blind = teacher_prompt(["cat", "dog"])
    assert "possible classes are: cat, dog." in blind
    assert all(f"<{t}>" in blind for t in TAGS) and "{" not in blind
    assert "belongs to" not in blind and '"dog"' not in blind and '"cat"' not in blind
    assert teacher_prompt(["cat", "dog"], "cat") != teacher_prompt(["cat", "dog"], "dog")


# -- InternVL's dynamic tiling (the model itself: tests/test_reasoning_internvl.py) --------------
@pytest.mark.parametrize(
    ("width", "height", "max_tiles", "grid"),
    [
        (448, 448, 12, (1, 1)),  # aspect 1; (2, 2) ties but 448² <= 0.5 · 448² · 4
        (227, 227, 12, (1, 1)),  # PACS's size
        (896, 448, 12, (2, 1)),  # aspect 2; (4, 2) ties but 2 · 448² <= 0.5 · 448² · 8
        (448, 896, 12, (1, 2)),
        (896, 896, 12, (2, 2)),  # tie won: 4 · 448² > 0.5 · 448² · 4; (3, 3): 4 <= 4.5
        (1344, 1344, 12, (3, 3)),  # 9 · 448² > 0.5 · 448² · 9; (4, 4) has 16 > 12 tiles
        (1344, 1344, 6, (2, 2)),  # (3, 3) has 9 > 6 tiles
        (672, 448, 12, (3, 2)),  # aspect 1.5 exactly: 6 tiles beat the (2, 1) tie winner
        (672, 448, 4, (2, 1)),  # |1.5 - 1| = |1.5 - 2|: tie won, 1.5 · 448² > 0.5 · 448² · 2
        (150, 100, 4, (1, 1)),  # the same tie lost: 15000 <= 0.5 · 448² · 2
        (4480, 448, 12, (10, 1)),  # aspect 10
        (448, 8960, 12, (1, 12)),  # aspect 1/20: 1/12 is the closest
        (1000, 10, 12, (12, 1)),  # aspect 100
        (896, 448, 1, (1, 1)),  # one tile
    ],
)
def test_tile_grid_by_hand(width, height, max_tiles, grid):
    from cdfsl.reasoning.internvl import INTERNVL_MAX_TILES, tile_grid

    assert INTERNVL_MAX_TILES == 12  # InternVL's max_num / max_dynamic_patch
    assert tile_grid(width, height, max_tiles) == grid


def test_tile_image_cuts_rows_then_adds_the_whole_image_as_thumbnail():
    from PIL import Image

    from cdfsl.reasoning.internvl import tile_image

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    image = Image.new("RGB", (56, 56))
    for k, colour in enumerate(colours):  # quadrants: top left, top right, bottom left, right
        image.paste(colour, (28 * (k % 2), 28 * (k // 2), 28 * (k % 2 + 1), 28 * (k // 2 + 1)))
    tiles = tile_image(image, tile_size=28)
    assert len(tiles) == 5 and all(t.size == (28, 28) for t in tiles[:4])
    assert [t.getpixel((14, 14)) for t in tiles[:4]] == colours
    assert tiles[4] is image  # the processor resizes it to one tile
    assert len(tile_image(image, tile_size=28, thumbnail=False)) == 4
    small = Image.new("RGB", (20, 20))
    assert tile_image(small, tile_size=28) == [small]  # one tile: no thumbnail
    assert tile_image(image, tile_size=28, max_tiles=1) == [image]


# -- micro DG world and teacher -----------------------------------------------------------------
def test_micro_dg_domains_share_classes_and_are_deterministic():
    assert len(list_dg_domains()) >= 4
    a, b = MicroDGDomain("cartoon", 2, seed=0), MicroDGDomain("aerial", 2, seed=0)
    assert a.class_names == b.class_names == list(COLOURS)  # colour classes by default
    assert a.targets == [i % 10 for i in range(20)]
    assert (a.array(3) == MicroDGDomain("cartoon", 2, seed=0).array(3)).all()
    assert not (a.array(3) == MicroDGDomain("cartoon", 2, seed=1).array(3)).all()
    assert a.scene(3).colour == "green" and a.scene(3).background == "leaf"
    assert b.scene(13).colour == "green" and b.scene(13).count == "many"
    assert MicroDGDomain("dermoscopy", 1).scene(2).count == "one"
    assert a.sample_id(9) == "cartoon/black/0-9"
    shapes = MicroDGDomain("xray", 2, seed=0, classes="shape")
    assert shapes.class_names == DG_CLASSES and shapes.scene(4).shape == "star"
    assert shapes.scene(0).colour == "white"  # x-ray: colour carries no signal
    assert shapes.sample_id(9) == "xray/triangle/0-9"
    train, test = micro_dg_split(["photo", "cartoon", "aerial"], "aerial", 2, 3)
    assert len(train) == 40 and len(test) == 30
    assert train.sample_id(20) == "cartoon/red/0-0"
    assert test.sample_id(0) == "aerial/red/1-0"  # test seed differs from training seed
    with pytest.raises(CdfslError, match="is unknown"):
        MicroDGDomain("sketch")
    with pytest.raises(CdfslError, match="fixes the colour of every image"):
        MicroDGDomain("xray", classes="colour")
    with pytest.raises(CdfslError, match="not one of the data domains"):
        micro_dg_split(["photo", "cartoon"], "xray", 1, 1)


@pytest.mark.parametrize("classes", ["colour", "shape"])
def test_template_teacher_writes_valid_chains_from_the_scene(classes):
    domains = ["photo", "cartoon", "dermoscopy", "aerial" if classes == "colour" else "xray"]
    train, _ = micro_dg_split(domains, "photo", 3, 1, classes=classes)
    chains = TemplateTeacher(seed=0).chains(train)
    labels = {train.sample_id(i): t for i, t in enumerate(train.targets)}
    report = validate_chains(chains, labels, train.class_names)
    assert len(report.kept) == len(train) and not report.rejected
    other = "shape" if classes == "colour" else "colour"
    for i in (0, 8, 20, 40, len(train) - 1):
        part, local = train.locate(i)
        scene, text = part.scene(local), chains[i].chain
        name = getattr(scene, classes)
        assert conclusion_text(text) == name == train.class_names[train.targets[i]]
        caption = text.split("<CAPTION>")[1].split("</CAPTION>")[0]
        assert f" {name} " not in caption  # the caption describes without naming the class
        assert getattr(scene, other) in caption and scene.count in caption
        assert part.style.caption in caption
    assert chains == TemplateTeacher(seed=0).chains(train)
    assert chains != TemplateTeacher(seed=1).chains(train)  # other paraphrases


# -- micro MLLM ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_model() -> MicroMLLM:
    texts = [label_prompt(), reason_prompt(), *DG_CLASSES, good_chain("star"), "object"]
    config = MicroMLLMConfig(vision="random", width=32, layers=2, heads=2, dropout=0.0)
    return MicroMLLM(config, WordVocabulary.from_texts(texts), seed=0).eval()


def test_vocabulary_round_trip():
    vocab = WordVocabulary.from_texts(["<SUMMARY> The Star, twice. </SUMMARY>"])
    assert vocab.words[:4] == list(WordVocabulary.SPECIALS)
    ids = vocab.encode("<SUMMARY> the star, twice. </SUMMARY>")
    assert vocab.decode(ids) == "<SUMMARY> the star, twice. </SUMMARY>"
    assert vocab.encode("moon")[0] == WordVocabulary.UNK
    assert (
        vocab.decode([*vocab.encode("star"), WordVocabulary.EOS, *vocab.encode("twice")]) == "star"
    )


def token_log_probs(
    model: MicroMLLM, inputs: torch.Tensor, prompt: str, target: str
) -> list[float]:
    """log p of each target word and <eos>, one position at a time through the KV cache:
    a different code path from the batched training forward."""
    prefix = [WordVocabulary.BOS, *model.vocabulary.encode(prompt)]
    answer = [*model.vocabulary.encode(target), WordVocabulary.EOS]
    with torch.no_grad():
        hidden, cache = model._hidden(inputs[None], torch.tensor([prefix]))
        position = hidden.shape[1]
        out = []
        for token in answer:
            log_p = F.log_softmax(model._logits(hidden[0, -1]).double(), dim=-1)
            out.append(float(log_p[token]))
            hidden, cache = model._hidden(inputs[None], torch.tensor([[token]]), position, cache)
            position += 1
    return out


def test_micro_nll_sum_and_length_normalised_mean_by_hand(micro_model):
    inputs = torch.randn(3, micro_model.num_image_tokens, micro_model.feature_width)
    prompts = [label_prompt(), reason_prompt(), label_prompt()]
    targets = ["star", good_chain("star"), "circle"]  # different lengths: right padding
    with torch.no_grad():
        summed = micro_model.nll(inputs, prompts, targets)
        mean = micro_model.nll(inputs, prompts, targets, length_normalise=True)
    for i in range(3):
        log_p = token_log_probs(micro_model, inputs[i], prompts[i], targets[i])
        assert summed[i].item() == pytest.approx(-sum(log_p), rel=1e-4)
        assert mean[i].item() == pytest.approx(-sum(log_p) / len(log_p), rel=1e-4)
    assert len(token_log_probs(micro_model, inputs[1], prompts[1], targets[1])) > 20


def test_mtct_loss_by_hand(micro_model):
    n = 4
    inputs = torch.randn(n, micro_model.num_image_tokens, micro_model.feature_width)
    labels = [0, 4, 4, 6]
    chains = [good_chain("circle"), None, good_chain("star") + " extra words", good_chain("heart")]
    examples = ReasoningExamples(ImageInputs.from_tensor(inputs), labels, DG_CLASSES, chains)
    batch = examples.collate(list(range(n)))
    module = MTCTModule(micro_model, label_weight=1.0, chain_weight=1.0)
    with torch.no_grad():
        terms = module.loss_terms(batch)
        loss = mtct_loss(terms["label_nll"], terms["chain_nll"])
    label_terms = [
        -sum(token_log_probs(micro_model, inputs[i], label_prompt(), DG_CLASSES[labels[i]]))
        for i in range(n)
    ]
    chain_terms = []
    for i in (0, 2, 3):  # image 1 has no chain: label loss only
        log_p = token_log_probs(micro_model, inputs[i], reason_prompt(), chains[i])
        chain_terms.append(-sum(log_p) / len(log_p))
    by_hand = sum(label_terms) / n + sum(chain_terms) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-4)
    weighted = mtct_loss(terms["label_nll"], terms["chain_nll"], 0.5, 2.0)
    assert weighted.item() == pytest.approx(
        0.5 * sum(label_terms) / n + 2 * sum(chain_terms) / 3, rel=1e-4
    )
    # label_reduction="mean": the label's token NLLs averaged as the chain's are
    assert TrainConfig().label_reduction == "sum" and module.label_reduction == "sum"
    per_token = MTCTModule(micro_model, label_reduction="mean")
    with torch.no_grad():
        mean_terms = per_token.loss_terms(batch)
    label_means = []
    for i in range(n):
        log_p = token_log_probs(micro_model, inputs[i], label_prompt(), DG_CLASSES[labels[i]])
        label_means.append(-sum(log_p) / len(log_p))
    mean_loss = mtct_loss(mean_terms["label_nll"], mean_terms["chain_nll"])
    assert mean_loss.item() == pytest.approx(sum(label_means) / n + sum(chain_terms) / 3, rel=1e-4)
    with pytest.raises(CdfslError, match="label_reduction='median'"):
        MTCTModule(micro_model, label_reduction="median")
    label_only = MTCTModule(micro_model, chain_weight=0.0).loss_terms(batch)
    assert set(label_only) == {"label_nll"}  # chain term not computed
    with pytest.raises(CdfslError, match="no loss term"):
        mtct_loss(None, None)


class LetterCost(GenerativeVLM):
    """A stand-in model: a target's token NLLs are its words' letter counts, then 1 for the
    end-of-answer token."""

    def image_inputs(self, images):
        return torch.zeros(len(images), 1)

    def nll(self, image_inputs, prompts, targets, length_normalise=False):
        costs = [[len(word) for word in t.split()] + [1] for t in targets]
        return torch.tensor([sum(c) / (len(c) if length_normalise else 1) for c in costs])

    def generate(self, image_inputs, prompts, max_new_tokens=128):
        return [""] * len(prompts)

    def reset_trainable(self, seed):
        pass


def test_mtct_label_reduction_by_hand():
    """Labels "dog" (tokens 3, 1) and "alarm clock" (5, 5, 1); chain "ab cd" (2, 2, 1) for the
    first image only. Spec default, label summed: (4 + 11)/2 + 5/3 = 55/6. Per token:
    (4/2 + 11/3)/2 + 5/3 = 27/6."""
    batch = {"image_inputs": torch.zeros(2, 1), "labels": ["dog", "alarm clock"]}
    batch["chains"] = ["ab cd", None]
    for module, by_hand in (
        (MTCTModule(LetterCost()), 55 / 6),
        (MTCTModule(LetterCost(), label_reduction="mean"), 27 / 6),
    ):
        terms = module.loss_terms(batch)
        loss = mtct_loss(terms["label_nll"], terms["chain_nll"])
        assert loss.item() == pytest.approx(by_hand)


def test_micro_generate_greedy_matches_argmax_and_stops_at_eos(micro_model):
    inputs = torch.randn(2, micro_model.num_image_tokens, micro_model.feature_width)
    answers = micro_model.generate(inputs, [label_prompt(), reason_prompt()], max_new_tokens=5)
    assert len(answers) == 2
    vocab = micro_model.vocabulary
    # the first greedy word is the argmax after the prompt
    prefix = torch.tensor([[WordVocabulary.BOS, *vocab.encode(label_prompt())]])
    with torch.no_grad():
        hidden, _ = micro_model._hidden(inputs[:1], prefix)
        first = int(micro_model._logits(hidden[0, -1]).argmax())
    if first == WordVocabulary.EOS:
        assert answers[0] == ""
    else:
        assert answers[0].split()[0] == vocab.words[first] or answers[0].startswith(
            vocab.words[first]
        )


def test_reset_trainable_is_seeded(micro_model):
    before = micro_model.trainable_state_dict()
    micro_model.reset_trainable(1)
    other = micro_model.trainable_state_dict()
    micro_model.reset_trainable(0)
    again = micro_model.trainable_state_dict()
    assert all(torch.equal(before[k], again[k]) for k in before)
    assert not all(torch.equal(before[k], other[k]) for k in before)
    assert not any(k.startswith("vision.") for k in before)  # the tower stays frozen


def test_missing_micro_clip_is_a_clear_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CDFSL_ASSETS", str(tmp_path))
    with pytest.raises(WeightsError, match=r"cdfsl pretrain-micro.*vision: random"):
        MicroMLLM(MicroMLLMConfig(vision="micro-clip"), WordVocabulary([]))


def test_missing_reason_extra_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    with pytest.raises(CdfslError) as err:
        require_reason_extra("the InternVL model")
    assert str(err.value) == (
        "the InternVL model needs peft, which is not installed; install the reasoning extra: "
        "pip install 'cdfsl[reason]'"
    )


# -- SARR ----------------------------------------------------------------------------------------
def test_sarr_filter_keeps_exactly_the_correct_conclusions():
    ids = ["a", "b", "c", "d", "e", "f"]
    labels = [0, 1, 2, 3, 0, 3]
    generated = [
        good_chain("circle"),  # correct
        good_chain("circle"),  # wrong class
        good_chain("The Alarm_Clock."),  # correct after normalisation
        "<SUMMARY> no conclusion </SUMMARY>",  # no CONCLUSION
        "<CONCLUSION> circle",  # cut off, still correct
        good_chain("a dog or a circle"),  # ambiguous
    ]
    kept, accepted = select_self_chains(ids, labels, generated, CLASSES, round_=2)
    assert accepted == [True, False, True, False, True, False]
    assert [c.image_id for c in kept] == ["a", "c", "e"]
    assert all(c.source == "self" and c.round == 2 for c in kept)
    teacher = {i: Chain(i, f"teacher {i}", "template", 0) for i in ids if i != "f"}
    mixed = replace_chains(teacher, kept, ids)
    assert [c.source if c else None for c in mixed] == [
        "self", "template", "self", "template", "self", None,
    ]  # fmt: skip


class _ScriptedModel(MicroMLLM):
    """A micro MLLM whose chains are scripted: the teacher chain (true class) for even images,
    a chain concluding the wrong class for odd ones; training is real."""

    script: ClassVar[list[str]] = []
    cursor = 0
    generate_calls = 0

    def generate(self, image_inputs, prompts, max_new_tokens=128):
        if prompts[0] != reason_prompt():
            return super().generate(image_inputs, prompts, max_new_tokens)
        type(self).generate_calls += 1
        start = _ScriptedModel.cursor
        _ScriptedModel.cursor += len(prompts)
        return self.script[start : start + len(prompts)]


def test_one_sarr_round_end_to_end_and_resume(tmp_path: Path):
    train, _ = micro_dg_split(["photo", "cartoon"], "cartoon", 2, 1, classes="shape")
    teacher = TemplateTeacher().chains(train)
    ids = [c.image_id for c in teacher]
    texts = [label_prompt(), reason_prompt(), *DG_CLASSES, *(c.chain for c in teacher)]
    config = MicroMLLMConfig(vision="random", width=32, layers=1, heads=2)
    model = _ScriptedModel(config, WordVocabulary.from_texts(texts), seed=0)
    wrong = [DG_CLASSES[(t + 1) % 7] for t in train.targets]
    _ScriptedModel.script = [
        c.chain
        if i % 2 == 0
        else c.chain.replace(
            f"<CONCLUSION> {DG_CLASSES[train.targets[i]]}", f"<CONCLUSION> {wrong[i]}"
        )
        for i, c in enumerate(teacher)
    ]
    # image 12: correct conclusion, but cut at the token limit: not kept (no room for <eos>)
    _ScriptedModel.script[12] = (
        " the outline" * 150 + " <CONCLUSION> " + DG_CLASSES[train.targets[12]]
    )
    _ScriptedModel.cursor = 0
    inputs = ImageInputs(model, train)
    train_config = TrainConfig(epochs=1, batch_size=7, lr=1e-3, accelerator="cpu")
    evaluated = []
    runner = SARRRunner(
        model, inputs, ids, train.targets, train.class_names, {c.image_id: c for c in teacher},
        train_config, tmp_path, SARRConfig(rounds=1, epochs_per_round=1),
        evaluate=lambda m: evaluated.append(1) or {"accuracy": 0.5},
        generate_batch_size=5,
    )  # fmt: skip
    before = model.trainable_state_dict()
    [metrics] = runner.run()
    assert metrics["accepted"] == 6 and metrics["generated"] == 14 and metrics["too_long"] == 1
    assert metrics["acceptance_rate"] == 6 / 14 and metrics["held_out"] == {"accuracy": 0.5}
    assert metrics["train"]["steps"] == 2 and "chain_nll" in metrics["train"]
    folder = tmp_path / "round-1"
    used = ChainStore(folder / "chains.jsonl").read()
    kept = [i % 2 == 0 and i != 12 for i in range(14)]
    assert [c.source for c in used] == ["self" if k else "template" for k in kept]
    generated = [json.loads(line) for line in (folder / "generated.jsonl").read_text().splitlines()]
    assert [g["accepted"] for g in generated] == kept
    assert (folder / "log" / "metrics.csv").is_file()
    after = model.trainable_state_dict()
    assert not all(torch.equal(before[k], after[k]) for k in before)  # it retrained
    # a rerun finds the round done: loads its weights, generates nothing, trains nothing
    model.reset_trainable(5)
    calls = _ScriptedModel.generate_calls
    assert runner.run()[0]["accepted"] == 6
    assert _ScriptedModel.generate_calls == calls and len(evaluated) == 1
    assert all(torch.equal(after[k], model.trainable_state_dict()[k]) for k in after)


# -- DG evaluation -------------------------------------------------------------------------------
def test_score_answers_counts_unparsable_as_wrong_with_wald_ci():
    answers = ["dog", "Dog.", "no idea", "circle", "<CONCLUSION> dog"]
    labels = [3, 3, 0, 1, 3]
    result = score_answers("art", "label", answers, labels, CLASSES, ["1", "2", "3", "4", "5"])
    # "<CONCLUSION> dog" parses by mention in label mode; "no idea" is unparsable
    correct = [1, 1, 0, 0, 1]
    p, n = 3 / 5, 5
    s = math.sqrt(sum((c - p) ** 2 for c in correct) / (n - 1))
    assert result.accuracy == pytest.approx(p)
    assert result.ci95 == pytest.approx(1.959963984540054 * s / math.sqrt(n))
    assert result.unparsable == 1 and result.rows[2]["parsed"] is False
    reason = score_answers("art", "reason", ["dog", good_chain("dog")], [3, 3], CLASSES, ["1", "2"])
    assert reason.accuracy == 0.5 and reason.unparsable == 1  # no CONCLUSION: unparsable


def test_average_and_markdown_table():
    a, b = {"accuracy": 0.8, "ci95": 0.03}, {"accuracy": 0.6, "ci95": 0.04}
    avg = average([a, b])
    assert avg["accuracy"] == pytest.approx(0.7) and avg["ci95"] == pytest.approx(0.025)
    table = markdown_table(
        {"MTCT": {"x": a, "y": b}, "Label-only": {"x": a}}, ["x", "y"], {"MTCT": "q"}
    )
    lines = table.splitlines()
    assert lines[0] == "| method | answer | x | y | average |"
    assert lines[2] == "| MTCT | q | 80.0 ± 3.0 | 60.0 ± 4.0 | 70.0 ± 2.5 |"
    assert lines[3] == "| Label-only |  | 80.0 ± 3.0 | - | - |"


# -- the command ---------------------------------------------------------------------------------
TINY_RUN = [
    "--model.vision", "random", "--model.width", "32", "--model.layers", "1",
    "--model.heads", "2", "--data.domains", "[photo, cartoon, aerial]",
    "--data.train_images_per_class", "1", "--data.test_images_per_class", "2",
    "--train.epochs", "1", "--train.batch_size", "7", "--sarr.rounds", "1",
    "--sarr.epochs_per_round", "1", "--generation.max_new_tokens", "12",
    "--held_out", "[aerial]",
]  # fmt: skip
RECIPE = str(Path(__file__).resolve().parents[1] / "recipes/rd_mldg/micro.yaml")


def main(args: list[str]) -> int:
    """``cdfsl reason ARGS`` as the CLI runs it (errors: one line on stderr, code 2), through
    this command's own parser only."""
    import sys

    from jsonargparse import ArgumentParser

    from cdfsl.commands import reason

    assert args[0] == "reason"
    parser = ArgumentParser()
    reason.configure(parser)
    try:
        reason.run(parser.parse_args(args[1:]))
    except CdfslError as err:
        print(f"cdfsl: error: {err}", file=sys.stderr)
        return 2
    return 0


def test_cdfsl_reason_reports_a_bad_chain_file_and_trains_on_the_rest(tmp_path, capsys):
    train, test = micro_dg_split(["photo", "cartoon", "aerial"], "aerial", 1, 2)
    chains = TemplateTeacher().chains(train)
    rows = [{"image_id": c.image_id, "chain": c.chain} for c in chains]
    rows[0]["chain"] = rows[0]["chain"].replace("<REASONING>", "")  # missing tag
    rows[1]["chain"] = rows[1]["chain"].replace("<CONCLUSION> orange", "<CONCLUSION> red")
    rows[2]["image_id"] = "photo/triangle/0-999"  # unknown id
    long = rows[3]["chain"].replace("<REASONING>", "<REASONING>" + " the outline" * 80)
    rows[3]["chain"] = long  # valid, but longer than the micro MLLM's context
    rows.append({"image_id": test.sample_id(0), "chain": chains[0].chain})  # held-out image
    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    out_dir = tmp_path / "run"
    args = ["reason", "--config", RECIPE, *TINY_RUN, "--teacher.kind", "file"]
    args += ["--teacher.path", str(path), "--output", str(out_dir)]

    assert main([*args, "--check_chains", "true"]) == 0
    checked = capsys.readouterr().out
    assert "17 training images with a chain" in checked
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "chains: 18 kept, 4 rejected" in out  # 17 training + 1 held-out image kept
    for reason in (
        "missing tag: 1",
        "wrong conclusion: 1",
        "unknown image id: 1",
        "malformed row: 1",
    ):
        assert reason in out
    assert "1 chains are too long for the model's context, e.g. 'photo/green/0-3'" in out
    assert "4 of 20 training images have no chain: label loss only" in out
    table = out[out.index("| method |") :].splitlines()
    assert table[0] == "| method | answer | aerial | average |"
    assert [row.split(" | ")[0] for row in table[2:6]] == [
        "| Label-only", "| Chain-only", "| MTCT", "| MTCT + SARR",
    ]  # fmt: skip
    summary = json.loads((out_dir / "summary.json").read_text())
    assert set(summary["held_out"]) == {"label-only", "chain-only", "mtct", "mtct-sarr"}
    assert summary["held_out"]["mtct"]["aerial"]["n"] == 20
    report = json.loads((out_dir / "fold-aerial" / "chain_report.json").read_text())
    assert report["rejected_by_reason"]["unknown image id"] == 1
    assert (out_dir / "fold-aerial" / "mtct-sarr" / "round-1" / "metrics.json").is_file()
    assert (out_dir / "fold-aerial" / "mtct" / "log" / "metrics.csv").is_file()
    csv_head = (
        (out_dir / "fold-aerial" / "mtct" / "log" / "metrics.csv").read_text().splitlines()[0]
    )
    assert "train/label_nll_step" in csv_head and "train/chain_nll_step" in csv_head

    # a rerun resumes: every variant is done, nothing trains again
    result = out_dir / "fold-aerial" / "mtct" / "result.json"
    stamp = result.stat().st_mtime_ns
    assert main(args) == 0
    assert "| MTCT + SARR |" in capsys.readouterr().out
    assert result.stat().st_mtime_ns == stamp
    # another recipe in the same folder is refused
    assert main([*args, "--train.lr", "0.5"]) == 2
    assert "holds results of a different configuration (changed: train)" in capsys.readouterr().err


def test_cdfsl_reason_without_any_valid_chain_stops_before_training(tmp_path, capsys):
    path = tmp_path / "teacher.jsonl"
    path.write_text(json.dumps({"image_id": "nobody", "chain": good_chain("star")}) + "\n")
    args = ["reason", "--config", RECIPE, *TINY_RUN, "--teacher.kind", "file"]
    assert main([*args, "--teacher.path", str(path), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no valid teacher chain for the training images of fold 'aerial'" in err
    assert not (tmp_path / "r" / "fold-aerial" / "label-only").exists()


def test_zero_shot_scores_the_model_as_built_without_chains(tmp_path, capsys):
    """The zero-shot variant trains nothing: its answers are a freshly built model's."""
    from jsonargparse import ArgumentParser

    from cdfsl.commands import reason
    from cdfsl.reasoning.dg import generate_all
    from cdfsl.reasoning.experiment import VARIANTS, ReasonRun, build_fold

    assert next(iter(VARIANTS)) == "zero-shot" and VARIANTS["zero-shot"].answer == "label"
    out_dir = tmp_path / "run"
    args = ["reason", "--config", RECIPE, *TINY_RUN, "--teacher.kind", "none"]
    args += ["--variants", "[zero-shot, label-only]", "--output", str(out_dir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| Zero-shot | q_cls | " in out and "| Label-only | q_cls | " in out
    folder = out_dir / "fold-aerial" / "zero-shot"
    result = json.loads((folder / "result.json").read_text())
    assert result["train"]["steps"] == 0 and not (folder / "adapter.pt").exists()
    assert (out_dir / "fold-aerial" / "label-only" / "adapter.pt").is_file()
    rows = [json.loads(line) for line in (folder / "answers-label.jsonl").read_text().splitlines()]

    parser = ArgumentParser()
    reason.configure(parser)
    config = reason.config_from(parser.parse_args(args[1:]))
    test = build_fold(config.data, "aerial").test
    fresh = ReasonRun(config).build_model([label_prompt(), reason_prompt(), *test.class_names])
    batch = config.generation.batch_size
    expected = generate_all(fresh, ImageInputs(fresh, test), label_prompt(), 12, batch)
    assert [r["answer"] for r in rows] == expected
    chained = reason.config_from(parser.parse_args([*args[1:], "--variants", "[mtct]"]))
    with pytest.raises(CdfslError, match=r"set variants to some of \[zero-shot, label-only\]"):
        ReasonRun(chained)


def test_domainbed_folds_file_teacher_and_requests(tmp_path, capsys):
    from layouts import make_domainbed

    from cdfsl.data.domainbed import DOMAINBED_DATASETS
    from cdfsl.reasoning.experiment import (
        DGDataConfig,
        TeacherConfig,
        build_fold,
        teacher_chains,
        teacher_requests,
    )

    pacs = next(d for d in DOMAINBED_DATASETS if d.name == "pacs")
    root = make_domainbed(tmp_path / "data", pacs, per_class=1)
    data = DGDataConfig(kind="domainbed", dataset="pacs", root=str(root))
    fold = build_fold(data, "sketch")
    assert len(fold.train) == 21 and len(fold.test) == 7 and len(fold.known) == 28
    requests = teacher_requests(fold.train)
    assert requests[0]["image_id"] == "art_painting/class_0/pic_0000.jpg"
    assert Path(requests[0]["image_path"]).is_file() and "class 0" in requests[0]["prompt"]
    assert len({r["prompt"] for r in requests}) == 1  # the class is not told by default
    told = teacher_requests(fold.train, tell_class=True)
    assert told[0]["prompt"] == teacher_prompt(fold.train.class_names, "class 0")
    rows = [
        {"image_id": fold.train.sample_id(i), "chain": good_chain(fold.train.class_names[t])}
        for i, t in enumerate(fold.train.targets)
    ]
    rows.append({"image_id": fold.test.sample_id(0), "chain": good_chain("class 0")})
    path = tmp_path / "chains.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report, chains = teacher_chains(
        TeacherConfig(kind="file", path=str(path), source="gpt-4o"), fold
    )
    assert len(report.kept) == 22 and not report.rejected  # the held-out image's chain is known
    assert len(chains) == 21 and all(c.source == "gpt-4o" for c in chains.values())

    out_dir = tmp_path / "run"
    args = ["reason", "--config", RECIPE, *TINY_RUN[:-2], "--data.kind", "domainbed"]
    args += ["--data.dataset", "pacs", "--data.root", str(root), "--data.domains", "null"]
    args += ["--held_out", "[sketch]", "--variants", "[label-only, mtct]", "--teacher.kind", "file"]
    args += ["--teacher.path", str(path), "--output", str(out_dir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| method | answer | sketch | average |" in out and "| MTCT |" in out
    assert "| Chain-only |" not in out
    with pytest.raises(CdfslError, match="template writes chains from the micro world"):
        teacher_chains(TeacherConfig(kind="template"), fold)


def test_a_new_variant_is_one_file_named_by_its_path(tmp_path, capsys, monkeypatch):
    """Worked example: a variant that weighs the label twice the chain is one Variant row in a
    file of one's own, named in ``--variants`` by its dotted path, run through ``cdfsl reason``."""
    from cdfsl.reasoning import experiment

    (tmp_path / "my_variants.py").write_text(
        "from cdfsl.reasoning.experiment import Variant\n"
        "LABEL_HEAVY = Variant('Label-heavy MTCT', 'mtct', 'reason', weights=(2.0, 1.0))\n"
        "NOT_A_ROW = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(experiment, "VARIANTS", experiment.Registry("variant", experiment.VARIANTS))
    out_dir = tmp_path / "run"
    args = ["reason", "--config", RECIPE, *TINY_RUN, "--variants", "[my_variants.LABEL_HEAVY]"]
    assert main([*args, "--output", str(out_dir)]) == 0
    assert "| Label-heavy MTCT | q_reason → CONCLUSION | " in capsys.readouterr().out
    fold = out_dir / "fold-aerial" / "my_variants.LABEL_HEAVY"
    assert json.loads((fold / "result.json").read_text())["train"]["steps"] > 0
    for entry, message in (
        ("my_variants.NOT_A_ROW", "expected a cdfsl.reasoning.experiment.Variant row"),
        ("my_variants.MISSING", "expected an importable Variant row"),
        ("label-heavy", "variants='label-heavy': expected one of"),
    ):
        with pytest.raises(CdfslError, match=message):
            experiment.variant_row(entry)


@pytest.mark.parametrize("dataset", ["pacs", "vlcs", "office-home", "terra-incognita"])
def test_paper_recipes_carry_the_papers_training_settings(dataset):
    """RD-MLDG's stated settings: InternVL3-8B, LoRA rank 8 on both towers, 3 epochs per stage,
    batch 128, learning rate 5e-4, N = 3 SARR rounds, every held-out domain."""
    from cdfsl.cli import build_parser

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "rd_mldg" / f"{dataset}.yaml"
    cfg = build_parser()[0].parse_args(["reason", "--config", str(recipe)]).reason
    assert cfg.model.path == "OpenGVLab/InternVL3-8B-hf"
    assert (cfg.model.lora.rank, cfg.model.lora.vision, cfg.model.lora.llm) == (8, True, True)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (3, 128, 5e-4)
    assert cfg.train.batch_size % cfg.train.micro_batch_size == 0
    assert (cfg.sarr.rounds, cfg.sarr.epochs_per_round) == (3, 3)
    assert cfg.held_out is None and cfg.data.dataset == dataset


def test_mtct_schedule_warms_up_then_follows_the_cosine_at_every_step(micro_model):
    """MTCT's wiring: warm-up over round(warmup_ratio · T) steps (linear, (k + 1)/W), then
    lr · (1 + cos(π (k − W)/(T − W)))/2, stepped once per optimiser step; AdamW's decay as set."""
    import types

    total, lr = 100, 5e-4
    module = MTCTModule(micro_model, lr=lr, weight_decay=0.01, warmup_ratio=0.03)
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=total)
    config = module.configure_optimizers()
    optimiser, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert optimiser.param_groups[0]["weight_decay"] == 0.01
    warmup = 3  # round(0.03 · 100)
    seen = []
    for _ in range(total):
        seen.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        scheduler.step()
    expected = [
        lr * (k + 1) / warmup
        if k < warmup
        else lr * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) / 2
        for k in range(total)
    ]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-15)
