"""Released weights files: float16 safetensors with a JSON card beside them."""

from __future__ import annotations

import json

import torch

from ssd_core.models import build_model
from ssd_core.storage.weights_file import card_path, load_weights, read_card, save_weights


def test_weights_round_trip_in_half_precision_with_their_card(tmp_path):
    torch.manual_seed(0)
    model = build_model("ssd-small", 4)
    model.train()(torch.rand(2, 3, 256, 256))  # BatchNorm statistics that are not the defaults
    state = model.state_dict()
    path = tmp_path / "out" / "model.safetensors"
    card = {"model": "ssd-small", "held_out": {"map_50": 0.9}}
    assert save_weights(state, path, card) == card_path(path) == tmp_path / "out" / "model.json"
    loaded = load_weights(path)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        if tensor.is_floating_point():
            assert loaded[name].dtype == torch.float32
            torch.testing.assert_close(loaded[name], tensor.half().float(), rtol=0, atol=0)  # float16 exactly
        else:  # num_batches_tracked: kept as it is
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    assert read_card(path) == card == json.loads(card_path(path).read_text())
    build_model("ssd-small", 4).load_state_dict(loaded)  # a model takes them as they are


def test_a_half_precision_file_is_half_the_size(tmp_path):
    state = build_model("ssd-small", 4).state_dict()
    save_weights(state, tmp_path / "half.safetensors", {})
    full = sum(t.numel() * t.element_size() for t in state.values())
    assert (tmp_path / "half.safetensors").stat().st_size < 0.55 * full


def test_a_file_without_a_card_reads_an_empty_one(tmp_path):
    assert read_card(tmp_path / "none.safetensors") == {}
