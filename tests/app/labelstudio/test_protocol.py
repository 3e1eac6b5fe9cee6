"""Label Studio's protocol as data (app.labelstudio.protocol): the label config, percent rectangles both ways
against a direct pixel computation, and the boxes an annotation loses (rotated, unknown labels, ...)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from app.labelstudio.protocol import (
    LabelConfigError,
    annotation_boxes,
    detections_to_results,
    parse_label_config,
    task_image_url,
    task_score,
)

CLASSES = ["rectangle", "ellipse", "triangle"]
CONFIG = """<View>
  <Header value="Boxes"/>
  <Image name="img" value="$photo" zoom="true"/>
  <RectangleLabels name="boxes" toName="img"><Label value="rectangle"/><Label value="Oval"/></RectangleLabels>
  <Choices name="quality" toName="img"><Choice value="good"/></Choices>
</View>"""


def test_parse_label_config_maps_labels():
    control = parse_label_config(CONFIG, CLASSES, {"Oval": "ellipse"})
    assert (control.from_name, control.to_name, control.image_key) == ("boxes", "img", "photo")
    assert control.labels == {"rectangle": 0, "Oval": 1}
    assert control.label_of_class == {0: "rectangle", 1: "Oval"}
    assert control.labelled_classes == [0, 1]  # the project labels no triangles: partial labels


def test_unknown_labels_are_all_listed():
    with pytest.raises(LabelConfigError) as error:
        parse_label_config(CONFIG.replace('value="rectangle"', 'value="Car"'), CLASSES)
    assert "['Car', 'Oval']" in str(error.value) and "SSD_LABEL_STUDIO_LABEL_MAP" in str(error.value)


@pytest.mark.parametrize("config, message", [
    ("<View><Image name='i' value='$x'/></View>", "no <RectangleLabels>"),
    ("<View><RectangleLabels name='b' toName='nope'><Label value='ellipse'/></RectangleLabels></View>", "<Image>"),
    ("<View><Image name='i' value='x'/><RectangleLabels name='b' toName='i'><Label value='ellipse'/>"
     "</RectangleLabels></View>", "$<task data key>"),
    ("<View><Image", "not XML"),
])
def test_unusable_configs(config, message):
    with pytest.raises(LabelConfigError, match=message.replace("$", r"\$")):
        parse_label_config(config, CLASSES)


def test_task_image_url():
    control = parse_label_config(CONFIG, CLASSES, {"Oval": "ellipse"})
    assert task_image_url({"id": 1, "data": {"photo": "/data/upload/1/a.png"}}, control) == "/data/upload/1/a.png"
    with pytest.raises(ValueError, match=r"data\.photo"):
        task_image_url({"id": 1, "data": {"image": "/x.png"}}, control)


coordinate = st.floats(0, 1, allow_nan=False)


@given(st.lists(st.tuples(coordinate, coordinate, coordinate, coordinate, st.sampled_from([0, 1]),
                          st.floats(0.01, 1)), max_size=6),
       st.integers(8, 400), st.integers(8, 400))
def test_results_round_trip_to_pixels(boxes, height, width):
    """Detections -> percent results -> annotation boxes gives the pixel boxes back (x1 < x2 by sorting)."""
    control = parse_label_config(CONFIG, CLASSES, {"Oval": "ellipse"})
    pixels = []
    for a, b, c, d, _, _ in boxes:
        x1, x2 = sorted((a * width, c * width))
        y1, y2 = sorted((b * height, d * height))
        pixels.append([x1, y1, x2 + 2, y2 + 2])  # at least 2 px wide, may pass the border by 2 px
    labels = [box[4] for box in boxes]
    results = detections_to_results(pixels, labels, [box[5] for box in boxes], (height, width), control)
    for result, box, label in zip(results, pixels, labels, strict=True):
        value = result["value"]  # the obvious computation, box by box
        assert value["x"] == pytest.approx(100 * box[0] / width)
        assert value["height"] == pytest.approx(100 * (box[3] - box[1]) / height)
        assert value["rectanglelabels"] == [control.label_of_class[label]]
        assert (result["original_width"], result["original_height"]) == (width, height)
    back = annotation_boxes(results, control, (height, width))
    clipped = [[min(box[0], width), min(box[1], height), min(box[2], width), min(box[3], height)] for box in pixels]
    sides = [side for box in clipped for side in (box[2] - box[0], box[3] - box[1])]
    assume(all(abs(side - 1) > 1e-6 for side in sides))  # the 1-pixel rule, away from rounding
    kept = [k for k, box in enumerate(clipped) if box[2] - box[0] >= 1 and box[3] - box[1] >= 1]
    assert [c for box in back.boxes for c in box] == pytest.approx([c for k in kept for c in clipped[k]])
    assert back.labels == [labels[k] for k in kept]
    assert back.skipped["empty"] == len(pixels) - len(kept)


def test_classes_outside_the_project_are_not_predicted():
    control = parse_label_config(CONFIG, CLASSES, {"Oval": "ellipse"})
    results = detections_to_results([[0, 0, 5, 5], [1, 1, 9, 9]], [2, 0], [0.9, 0.4], (10, 10), control)
    assert [r["value"]["rectanglelabels"] for r in results] == [["rectangle"]]
    assert task_score(results) == pytest.approx(0.4)
    assert task_score([]) == 0.0


def test_skipped_boxes_are_counted_by_reason():
    control = parse_label_config(CONFIG, CLASSES, {"Oval": "ellipse"})
    box = {"x": 10, "y": 10, "width": 50, "height": 50}
    result = [
        {"from_name": "boxes", "type": "rectanglelabels", "value": {**box, "rectanglelabels": ["Oval"]}},
        {"from_name": "boxes", "type": "rectanglelabels", "value": {**box, "rotation": 30,
                                                                    "rectanglelabels": ["Oval"]}},
        {"from_name": "boxes", "type": "rectanglelabels", "value": {**box, "rotation": 360,
                                                                    "rectanglelabels": ["rectangle"]}},
        {"from_name": "boxes", "type": "rectanglelabels", "value": {**box, "rectanglelabels": ["Car"]}},
        {"from_name": "boxes", "type": "rectanglelabels", "value": {**box, "rectanglelabels": ["Oval", "rectangle"]}},
        {"from_name": "boxes", "type": "polygonlabels", "value": {"points": [[1, 1]], "polygonlabels": ["Oval"]}},
        {"from_name": "boxes", "type": "rectanglelabels", "value": {**box, "width": 0.1,
                                                                    "rectanglelabels": ["Oval"]}},
        {"from_name": "quality", "type": "choices", "value": {"choices": ["good"]}},  # another control: ignored
    ]
    found = annotation_boxes(result, control, (200, 100))
    assert found.boxes == [[10.0, 20.0, 60.0, 120.0]] * 2 and found.labels == [1, 0]
    assert dict(found.skipped) == {"rotated": 1, "unknown_label": 2, "not_rectangle": 1, "empty": 1}
