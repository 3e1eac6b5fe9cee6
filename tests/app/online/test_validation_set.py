"""The validation set (app.online.validation_set) through its routes: JSON and multipart, the view,
clearing, and corrupt entries dropped at restart."""

from __future__ import annotations

import json

from ssd_core.data.images import encode_png
from ssd_core.storage.sample_store import content_key
from tests.app.conftest import OVERFIT, assert_error, labelled, start_client
from tests.app.online.conftest import EVERYTHING, gated_settings


def test_validation_routes_json_multipart_view_and_clear(tmp_path):
    with start_client(gated_settings(tmp_path, validation_max_images=3)) as client:
        added = client.post("/validation", json={"images": labelled(OVERFIT, (0, 1))}).json()
        assert added["added"] == 2 and added["images"] == 2 and added["dropped"] == 0
        files = [("images", (f"{i}.png", encode_png(OVERFIT[i].image), "image/png")) for i in (2, 3)]
        notes = [{"boxes": OVERFIT[i].boxes.tolist(), "labels": OVERFIT[i].labels.tolist()} for i in (2, 3)]
        response = client.post("/validation", files=files, data={"annotations": json.dumps(notes)})
        assert response.status_code == 200, response.text
        assert response.json()["images"] == 3  # bounded: reservoir sampling past 3
        view = client.get("/validation").json()
        assert view["images"] == 3 and view["max_images"] == 3 and len(view["entries"]) == 3
        counts = {}
        for i in EVERYTHING:
            if content_key(encode_png(OVERFIT[i].image)) in {e["key"] for e in view["entries"]}:
                for label in OVERFIT[i].labels.tolist():
                    name = ["rectangle", "ellipse", "triangle"][label]
                    counts[name] = counts.get(name, 0) + 1
        assert view["boxes"] == counts and view["bytes"] == sum(e["bytes"] for e in view["entries"])
        assert_error(client.post("/validation", json={"images": [{**labelled(OVERFIT, (0,))[0], "labels": [7]}]}),
                     422, "images[0].labels[0]")
        cleared = client.delete("/validation").json()
        assert cleared["images"] == 0 and client.sample("ssd_validation_images") == 0


def test_corrupt_validation_entries_are_dropped_and_counted_at_restart(tmp_path):
    settings = gated_settings(tmp_path)
    with start_client(settings) as client:
        client.post("/validation", json={"images": labelled(OVERFIT, EVERYTHING)})
    entries = sorted((settings.checkpoint_dir / "validation").glob("*.sample"))
    entries[0].write_bytes(entries[0].read_bytes()[:-10])  # torn
    with start_client(settings) as client:
        view = client.get("/validation").json()
        assert view["images"] == 3 and view["corrupt_dropped"] == 1
        assert client.get("/readyz").status_code == 200
