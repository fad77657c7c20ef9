"""The shipped, trained toy-llava / toy-llava-small: files, processor, loading, accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_trial
from transformers import LlavaProcessor

from prunelab.sweeps import group_config
from prunelab.train_toy import PROMPT_TEMPLATE, cell_labels, patch_cells
from prunelab.workers.adapters import adapter_for
from prunelab.workers.benchmarks.scenes import ScenesBenchmark, scenes_vocabulary
from prunelab.workers.models import BUILTIN_DIR, ModelSpec, describe_model, load_model
from prunelab.workers.runner import run_trial

NAMES = ("toy-llava", "toy-llava-small")


def test_shipped_weights_are_small_safetensors() -> None:
    total = 0
    for name in NAMES:
        directory = BUILTIN_DIR / name
        weights = sorted(directory.glob("*.safetensors"))
        assert weights, f"{name}: no safetensors"
        assert not list(directory.glob("*.bin")), f"{name}: pickled weights shipped"
        total += sum(w.stat().st_size for w in weights)
        config = json.loads((directory / "config.json").read_text())
        assert config["model_type"] == "llava"
        assert config["vision_feature_layer"] == -2
        assert config["vision_feature_select_strategy"] == "default"
    assert total <= 10 * 2**20, f"{total / 2**20:.1f} MiB of weights"


def test_small_model_shares_the_vision_tower() -> None:
    large = load_file(BUILTIN_DIR / "toy-llava" / "model.safetensors")
    small = load_file(BUILTIN_DIR / "toy-llava-small" / "model.safetensors")
    tower = [k for k in large if "vision_tower" in k]
    assert len(tower) > 10
    for key in tower:
        assert torch.equal(large[key], small[key]), key
    (head,) = [k for k in large if k.endswith("lm_head.weight")]
    assert small[head].shape[1] < large[head].shape[1]  # a narrower LLM


def test_processor_round_trip() -> None:
    processor = LlavaProcessor.from_pretrained(BUILTIN_DIR / "toy-llava")
    tokenizer = processor.tokenizer
    words = scenes_vocabulary()  # scenes' words include shapes'
    ids = tokenizer(" ".join(words))["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids) == words

    sample = ScenesBenchmark().sample(1)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == PROMPT_TEMPLATE.format(question=sample.question)
    batch = processor(images=sample.image, text=prompt, return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 96, 96)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 144
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).endswith("assistant :")


def test_builtin_path_resolves_to_the_package() -> None:
    spec = ModelSpec.from_config(group_config("model", "toy-llava"))
    assert spec.path == str(BUILTIN_DIR / "toy-llava")
    info = describe_model(spec)
    assert info.n_visual == 144 and info.revision.startswith("builtin-")
    assert describe_model(spec).revision == info.revision
    with pytest.raises(ValueError, match="no built-in model 'nope'"):
        ModelSpec.from_config({**group_config("model", "toy-llava"), "path": "builtin:nope"})


def test_patch_labels_follow_the_cells() -> None:
    # 48 px image, 8 px patches, 3 x 3 grid: every cell is a 2 x 2 block of patches
    cells = patch_cells(3, 48, 8)
    assert cells[:6] == [0, 0, 1, 1, 2, 2] and cells[-6:] == [6, 6, 7, 7, 8, 8]
    labels = cell_labels([("red", "circle"), None, *[None] * 6, ("purple", "cross")], 3, 48, 8)
    assert labels[0] == labels[1] == labels[6] == labels[7] == 1  # red circle
    assert labels[2] == 0 and labels[-1] == 1 + 4 * 4 + 3  # empty, purple cross


SCENES_TEST = {"name": "scenes", "kind": "scenes", "split": "test"}


@pytest.mark.parametrize(("name", "floor"), [("toy-llava", 90.0), ("toy-llava-small", 75.0)])
def test_unpruned_accuracy_on_held_out_split(name: str, floor: float) -> None:
    """The shipped weights, loaded like a real model, on 300 `scenes` test samples (a split
    the training never saw: training uses `train`, validation `val`): the model at least 90%,
    its guide 75% (issue 16's bars)."""
    trial = tiny_trial(name, "none", 300, benchmark="scenes", benchmark_config=SCENES_TEST)
    loaded = load_model(trial.model_config)
    out = run_trial(loaded, adapter_for(loaded), trial)
    assert out.metrics["samples"] == 300
    assert out.metrics["score"] >= floor, out.metrics["score"]  # exact match, in %


def test_training_turns_start_with_the_evaluation_prompt() -> None:
    from prunelab.train_toy import ToyConfig, build_processor, encode
    from prunelab.workers.benchmarks.shapes import ShapesBenchmark

    vision = ToyConfig().vision  # the shapes world's
    processor = build_processor(vision)
    data = encode("train", 3, processor, vision, turns=4)
    bench = ShapesBenchmark(split="train")
    tokenizer = processor.tokenizer
    for i in range(3):
        sample = bench.sample(i)
        prompt = processor(
            images=sample.image,
            text=PROMPT_TEMPLATE.format(question=sample.question),
            return_tensors="pt",
        )["input_ids"][0]
        first = int(data.answer_pos[i, 0])
        assert torch.equal(data.input_ids[i, :first], prompt)  # turn 1 = the eval prompt
        answers = tokenizer.convert_ids_to_tokens(data.input_ids[i, data.answer_pos[i]].tolist())
        assert answers[0] == sample.answers[0] and len(set(answers)) >= 2
        after = data.input_ids[i, data.answer_pos[i] + 1]
        assert (after == tokenizer.eos_token_id).all()
    assert (data.patch_labels[:, :2] == data.patch_labels[:, :1]).all()  # 2 x 2 patches / cell


def test_each_packed_turn_computes_its_evaluation_prompt() -> None:
    """A training row packs several questions about one image after one image prompt; each
    turn's answer logits equal those of the model run on that question's evaluation prompt
    alone, and no turn sees another's tokens."""
    from transformers import LlavaForConditionalGeneration

    from prunelab.train_toy import (
        answer_logits,
        build_processor,
        build_toy_config,
        encode,
        tower_features,
        world_sizes,
    )

    sizes = world_sizes("scenes")
    vision = sizes["vision"]
    processor = build_processor(vision, "scenes")
    data = encode("train", 2, processor, vision, turns=8, benchmark="scenes")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(
        build_toy_config(vision, sizes["text"], processor.tokenizer)
    ).eval()
    with torch.no_grad():
        data.features = tower_features(model, data.pixel_values)
        packed = answer_logits(model, data.batch(torch.arange(2)))  # (2, T, 2, V)
    for i in range(2):
        turns = int(data.answer_mask[i].sum())
        assert turns >= 6  # every category at least once
        shared = int((data.segments[i] == 0).sum())
        for t in range(turns):
            pos = int(data.answer_pos[i, t])
            start = int((data.segments[i] == data.segments[i, pos]).nonzero()[0])
            # the turn alone: the image prompt, then its question, as the model sees it at eval
            alone = torch.cat([data.input_ids[i, :shared], data.input_ids[i, start:pos]])
            with torch.no_grad():
                logits = model(input_ids=alone[None], pixel_values=data.pixel_values[i : i + 1])
            torch.testing.assert_close(packed[i, t, 0], logits.logits[0, -1], atol=1e-5, rtol=1e-5)
            assert int(data.position_ids[i, pos - 1]) == len(alone) - 1


def test_scenes_training_targets() -> None:
    """On ``scenes``: one anchor per object, on the patch under its centre; more turns than
    question categories ask again; the balanced class loss and the heads run on a batch."""
    from prunelab.train_toy import (
        VisionHeads,
        build_processor,
        build_toy_config,
        encode,
        world_sizes,
    )
    from prunelab.workers.benchmarks.scenes import ScenesBenchmark

    vision = world_sizes("scenes")["vision"]
    processor = build_processor(vision, "scenes")
    data = encode("train", 4, processor, vision, turns=12, benchmark="scenes")
    bench = ScenesBenchmark(split="train", size=4, image_size=vision["image_size"])
    side = vision["image_size"] // vision["patch_size"]
    for i in range(4):
        objects = bench.sample(i).extra["objects"]
        marked = set(torch.nonzero(data.anchors[i]).flatten().tolist())
        centres = {int(o["cy"] // 8) * side + int(o["cx"] // 8) for o in objects}
        assert marked == centres and len(marked) == len(objects)
        assert all(data.patch_labels[i, k] > 0 for k in marked)  # a centre lies on its object
    assert data.answer_mask.sum(dim=1).min() > 6  # a second round of categories
    # each visual token's alignment words: its object's colour and shape, its side of each midline
    tokenizer = processor.tokenizer
    for i in range(4):
        objects = bench.sample(i).extra["objects"]
        for k in range(side * side):
            row, col = divmod(k, side)
            words = data.patch_words[i, k].tolist()
            horizontal, vertical = tokenizer.convert_ids_to_tokens(words[2:])
            assert horizontal == ("left" if col < side // 2 else "right")
            assert vertical == ("top" if row < side // 2 else "bottom")
            label = int(data.patch_labels[i, k])
            if label == 0:
                assert words[:2] == [-100, -100]
            else:
                colour, shape = tokenizer.convert_ids_to_tokens(words[:2])
                assert (colour, shape) in {(o["color"], o["shape"]) for o in objects}
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(
        build_toy_config(vision, world_sizes("scenes")["text"], processor.tokenizer)
    )
    heads = VisionHeads(vision["hidden_size"], 21, side * side, objects=True)
    loss, metrics = heads.loss(model, data.batch(torch.arange(4)))
    assert loss.isfinite() and set(metrics) == {"patch", "object", "set", "anchor", "xy_error"}
    # the alignment loss: lower once the projector maps each token near its words' embeddings
    from prunelab.train_toy import align_loss, tower_features

    with torch.no_grad():
        data.features = tower_features(model, data.pixel_values)
    batch = data.batch(torch.arange(4))
    before = align_loss(model, batch).item()
    projector = model.model.multi_modal_projector
    opt = torch.optim.Adam(projector.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        align_loss(model, batch).backward()
        opt.step()
    assert align_loss(model, batch).item() < 0.8 * before


def test_scenes_recipe_trains_and_saves_loadable_models(tmp_path) -> None:
    """The whole scenes recipe at a few steps: both models saved with their processor and
    training record, loadable through ``from_pretrained``, answering on 144 visual tokens; a
    second run from scratch gives bit-identical weights (deterministic by seed)."""
    from transformers import LlavaForConditionalGeneration

    from prunelab.train_toy import main

    steps = ["vision_steps=3", "vqa_steps=3", "small_steps=3", "train_images=32"]
    for out in (tmp_path, tmp_path / "again"):
        argv = ["--out", str(out), "--benchmark", "scenes", "--set", "val_images=8"]
        assert main([*argv, *(a for s in steps for a in ("--set", s))]) == 0
    for name in ("toy-llava", "toy-llava-small"):
        weights = [d / name / "model.safetensors" for d in (tmp_path, tmp_path / "again")]
        assert weights[0].read_bytes() == weights[1].read_bytes(), name
    for name in ("toy-llava", "toy-llava-small"):
        record = json.loads((tmp_path / name / "training.json").read_text())
        assert record["config"]["benchmark"] == "scenes" and record["config"]["vqa_steps"] == 3
        assert set(record["val"]["toy-llava"]) >= {"accuracy", "color", "exist"}
        model = LlavaForConditionalGeneration.from_pretrained(tmp_path / name)
        processor = LlavaProcessor.from_pretrained(tmp_path / name)
        batch = processor(
            images=torch.zeros(96, 96, 3, dtype=torch.uint8).numpy(),
            text=PROMPT_TEMPLATE.format(question="how many objects are there?"),
            return_tensors="pt",
        )
        assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 144
        with torch.no_grad():
            assert model(**batch).logits.isfinite().all()
