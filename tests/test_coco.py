"""COCO loading: which annotations become instances, box clipping and user errors."""

import json

import numpy as np
import pytest

from kdcache.coco import load_coco, load_instances
from kdcache.errors import UserError


def _keypoints(n_labelled, x=20, y=30):
    """17 COCO keypoints, the first `n_labelled` at (x + i, y + i) with v=2."""
    kpts = []
    for i in range(17):
        kpts += [x + i, y + i, 2] if i < n_labelled else [0, 0, 0]
    return kpts


def _ann(ann_id, image_id, bbox, n_labelled=3, **extra):
    ann = {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": bbox, "iscrowd": 0,
           "area": float(bbox[2] * bbox[3]), "keypoints": _keypoints(n_labelled), "num_keypoints": n_labelled}
    ann.update(extra)
    return ann


@pytest.fixture()
def ann_file(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50}],
        "categories": [{"id": 1, "name": "person", "keypoints": [], "skeleton": []},
                       {"id": 2, "name": "dog"}],
        "annotations": [
            _ann(14, 1, [-5, 60, 200, 100]),  # exceeds the image: clipped to (0, 60, 99, 19)
            _ann(10, 1, [10.5, 10, 30, 40], area=612.5),  # plain: kept, w-1 / h-1 as ViTPose
            _ann(11, 1, [10, 10, 30, 40], iscrowd=1),  # crowd
            _ann(12, 1, [10, 10, 30, 40], n_labelled=0),  # no labelled keypoint
            _ann(13, 1, [10, 10, 30, 40], area=0.0),  # zero area
            _ann(17, 1, [10, 10, 1, 5]),  # 1 px wide: x2 = x1 + (w - 1) = x1, empty
            _ann(15, 2, [60, 10, 20, 20]),  # right of the image: empty after clipping
            _ann(16, 2, [5, 5, 20, 20], category_id=2),  # not a person
            _ann(9, 2, [5, 5, 20, 20], n_labelled=17),  # kept; sorts after image 1
        ],
    }
    path = tmp_path / "person_keypoints_val.json"
    path.write_text(json.dumps(coco))
    return path


def test_load_instances_keeps_exactly_the_vitpose_set(ann_file):
    instances = load_instances(ann_file)
    assert [(i.image_id, i.ann_id) for i in instances] == [(1, 10), (1, 14), (2, 9)]
    plain, clipped, full = instances
    np.testing.assert_array_equal(plain.bbox_xywh, [10.5, 10, 29, 39])
    np.testing.assert_array_equal(clipped.bbox_xywh, [0, 60, 99, 19])
    assert plain.bbox_xywh.dtype == np.float32 and plain.keypoints.dtype == np.float32
    assert plain.keypoints.shape == (17, 3)
    np.testing.assert_array_equal(plain.keypoints[2], [22, 32, 2])
    np.testing.assert_array_equal(plain.keypoints[3], [0, 0, 0])
    assert (plain.file_name, plain.image_wh, plain.area) == ("a.jpg", (100, 80), 612.5)
    assert (full.file_name, full.image_wh) == ("b.jpg", (50, 50))
    assert (full.keypoints[:, 2] == 2).all()


def test_missing_or_invalid_annotation_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_instances(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        load_coco(bad)
    no_person = tmp_path / "dogs.json"
    no_person.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 2, "name": "dog"}]}))
    with pytest.raises(UserError, match="person"):
        load_instances(no_person)


def _write(tmp_path, coco, name="person_keypoints_x.json"):
    path = tmp_path / name
    path.write_text(json.dumps(coco))
    return path


def _one_person(**changes):
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
            "categories": [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(17)]}],
            "annotations": [_ann(10, 1, [10, 10, 30, 40])]}
    for change in changes.values():
        change(coco)
    return coco


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("categories"), r"has no 'categories' list"),
    (lambda c: c["annotations"][0]["keypoints"].__setitem__(4, "31"), r"annotation 10 has keypoints that are not all"),
    (lambda c: c["annotations"][0]["keypoints"].__setitem__(4, None), r"annotation 10 has keypoints that are not all"),
    (lambda c: c["annotations"][0].update(id=0), r"annotation #0 has id 0, not a positive integer"),
    (lambda c: c["annotations"][0].update(id=-3), r"annotation #0 has id -3, not a positive integer"),
    (lambda c: c["annotations"].append(_ann(10, 1, [5, 5, 9, 9])), r"annotation id 10 appears twice"),
    (lambda c: (c["images"][0].update(id="1"), c["annotations"][0].update(image_id="1")),
     r"image '1' has no integer id"),
    (lambda c: c["annotations"][0].update(image_id=2), r"annotation 10 refers to image 2, which is not in"),
    (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), r"annotation 10 has bbox \[1, 2, 3\]"),
    (lambda c: c["annotations"][0].update(keypoints=[1, 2, 2] * 16), r"has 48 keypoint values, expected 17 x 3"),
    (lambda c: c["images"][0].pop("height"), r"image 1 needs a file_name and positive integer width and height"),
    (lambda c: c["categories"].append({"id": 3, "name": "Person"}), r"several person categories"),
])
def test_malformed_annotation_files_are_refused_up_front(tmp_path, change, message):
    path = _write(tmp_path, _one_person(change=change))
    with pytest.raises(UserError, match=message) as info:
        load_instances(path)
    assert path.name in str(info.value) and "\n" not in str(info.value)


def test_converted_files_get_what_cocoeval_reads(tmp_path):
    """CrowdPose/AIC-style persons: no area, num_keypoints or iscrowd; a person without keypoints."""
    bare = _ann(10, 1, [10, 10, 30, 40], n_labelled=3)
    for key in ("area", "num_keypoints", "iscrowd"):
        bare.pop(key)
    no_keypoints = {"id": 11, "image_id": 1, "category_id": 7, "bbox": [50, 5, 20, 30]}
    bare["category_id"] = 7  # a person category that is not 1, found by its name
    path = _write(tmp_path, {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
                             "categories": [{"id": 2, "name": "dog"}, {"id": 7, "name": "person"}],
                             "annotations": [bare, no_keypoints]})
    coco = load_coco(path)
    assert (coco.anns[10]["area"], coco.anns[10]["num_keypoints"], coco.anns[10]["iscrowd"]) == (1200.0, 3, 0)
    assert coco.anns[11]["keypoints"] == [0] * 51 and coco.anns[11]["num_keypoints"] == 0  # COCOeval ignores it
    assert coco.anns[11]["area"] == 600.0
    instances = load_instances(path)
    assert [(i.ann_id, i.area) for i in instances] == [(10, 1200.0)]


def test_person_category_is_the_only_one_with_keypoints_when_none_is_named_person(tmp_path):
    from kdcache.coco import keypoint_count, subject_category_ids

    coco = _one_person(change=lambda c: c["categories"].__setitem__(0, {"id": 4, "name": "human",
                                                                        "keypoints": [f"k{i}" for i in range(17)]}))
    coco["annotations"][0]["category_id"] = 4
    loaded = load_coco(_write(tmp_path, coco))
    assert (subject_category_ids(loaded), keypoint_count(loaded)) == ((4,), 17)
    assert [i.ann_id for i in load_instances(tmp_path / "person_keypoints_x.json")] == [10]


def test_persons_picks_labelled_unlabelled_or_all_and_declares_keypoints_tells_image_info_apart(tmp_path):
    from kdcache.coco import declares_keypoints, instances_from_coco

    person = {"id": 1, "name": "person"}
    image = {"id": 3, "file_name": "a.jpg", "width": 100, "height": 80}
    labelled = {"id": 1, "image_id": 3, "category_id": 1, "bbox": [10, 10, 30, 50],
                "keypoints": [20, 20, 2] + [0, 0, 0] * 16, "num_keypoints": 1}
    boxed = {"id": 2, "image_id": 3, "category_id": 1, "bbox": [50, 10, 30, 50]}  # instances_*.json style
    crowd = {**boxed, "id": 4, "iscrowd": 1}
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [image], "annotations": [labelled, boxed, crowd], "categories": [person]}))
    coco = load_coco(path)
    assert declares_keypoints(coco)
    picked = {p: [i.ann_id for i in instances_from_coco(coco, path, p)] for p in ("labelled", "unlabelled", "all")}
    assert picked == {"labelled": [1], "unlabelled": [2], "all": [1, 2]}  # never the crowd
    no_gt = instances_from_coco(coco, path, "unlabelled")[0]
    assert not no_gt.labelled and no_gt.keypoints.shape == (17, 3) and not no_gt.keypoints.any()
    assert instances_from_coco(coco, path)[0].labelled and no_gt.score == 1.0
    with pytest.raises(UserError, match="unknown --persons 'some'; choose one of labelled, unlabelled, all"):
        instances_from_coco(coco, path, "some")
    path.write_text(json.dumps({"images": [image], "annotations": [boxed], "categories": [person]}))
    assert not declares_keypoints(load_coco(path))  # boxes without keypoints say nothing about keypoints
    path.write_text(json.dumps({"images": [image], "categories": [person]}))  # an image-info file
    assert not declares_keypoints(load_coco(path))
    path.write_text(json.dumps({"images": [image], "categories": [{**person, "keypoints": ["nose"] * 17}]}))
    assert declares_keypoints(load_coco(path))


def test_keypoint_set_read_from_the_category_however_spelt_else_by_an_unambiguous_count(tmp_path):
    """AIC files spell 'Right Shoulder'; a 14-joint file without names could be CrowdPose or AIC: refused."""
    from kdcache.coco import keypoint_set_of
    from kdcache.keypoints import AIC_14, CROWDPOSE_14

    def file_with(names, count=14):
        kpts = [10, 10, 2] * count
        return _write(tmp_path, {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
                                 "categories": [{"id": 1, "name": "person", "keypoints": names}],
                                 "annotations": [_ann(10, 1, [5, 5, 30, 40], keypoints=kpts, num_keypoints=count)]})

    spelt = [n.replace("_", " ").title() for n in AIC_14.names]  # "Right Shoulder", ...
    assert keypoint_set_of(load_coco(file_with(spelt))) is AIC_14
    assert keypoint_set_of(load_coco(file_with(list(CROWDPOSE_14.names)))) is CROWDPOSE_14
    path = file_with([])
    with pytest.raises(UserError, match=r"14 keypoints per person, as CrowdPose and AIC have") as info:
        keypoint_set_of(load_coco(path), path)
    assert "\n" not in str(info.value) and "crowdpose-14" in str(info.value)


def test_ap10k_species_are_all_subjects_and_results_keep_each_animals_species(tmp_path):
    """AP-10K files list one category per species, all with its 17 keypoints: every such category's animals are
    instances, each keeps its species, and results are written under it (mmpose's AP-10K evaluation takes each
    result's category from its box), so COCOeval averages over the species as AP-10K's numbers do."""
    from kdcache.boxes import gt_person_boxes
    from kdcache.coco import keypoint_set_of, subject_category_ids
    from kdcache.keypoints import keypoint_set
    from kdcache.metrics import coco_keypoint_metrics
    from kdcache.results import coco_results

    ap10k = keypoint_set("ap10k-17")
    species = [{"id": i, "name": name, "supercategory": family, "keypoints": list(ap10k.names),
                "skeleton": [list(p) for p in ap10k.skeleton]}
               for i, (name, family) in enumerate((("antelope", "Bovidae"), ("dog", "Canidae"), ("cat", "Felidae")),
                                                  start=1)]
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100}],
            "categories": species,
            "annotations": [_ann(10, 1, [10, 10, 60, 40], n_labelled=17, category_id=1),
                            _ann(11, 1, [100, 10, 60, 40], n_labelled=17, category_id=3)]}
    coco["annotations"][1]["keypoints"][0::3] = [x + 100 for x in coco["annotations"][1]["keypoints"][0::3]]
    loaded = load_coco(_write(tmp_path, coco))
    assert subject_category_ids(loaded) == (1, 2, 3) and keypoint_set_of(loaded) is ap10k
    assert [(i.ann_id, i.category_id) for i in load_instances(tmp_path / "person_keypoints_x.json")] == [(10, 1),
                                                                                                         (11, 3)]
    boxes = gt_person_boxes(loaded)
    kps = np.stack([np.asarray(a["keypoints"], np.float32).reshape(17, 3) for a in coco["annotations"]])
    kps[:, :, 2] = 0.9
    results = coco_results(boxes, kps, np.array([2400.0, 2400.0]), ap10k)
    assert [r["category_id"] for r in results] == [1, 3]
    assert coco_keypoint_metrics(loaded, results)["AP"] == pytest.approx(100.0)
    # Written under one category, the cat would count as missed and the antelope's as a false positive.
    assert coco_keypoint_metrics(loaded, [dict(r, category_id=1) for r in results])["AP"] < 60.0

    coco["categories"][1]["keypoints"] = coco["categories"][1]["keypoints"][:14]
    with pytest.raises(UserError, match="name different keypoints; kdcache reads one keypoint set per file"):
        load_coco(_write(tmp_path, coco, "mixed.json"))
