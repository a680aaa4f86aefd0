"""Keypoints of boxes: the codec's crop, decoding and the way back to image pixels are exact enough to score
ground truth at AP ~100; crops of boxes are the codec's un-augmented crops."""

import numpy as np

from kdcache.boxes import gt_person_boxes
from kdcache.codec import UDPHeatmap
from kdcache.coco import load_instances
from kdcache.keypoints import COCO_17
from kdcache.metrics import coco_keypoint_metrics
from kdcache.predict import BoxCrops, heatmaps_to_image
from kdcache.results import coco_results
from kdcache.transforms import bbox_to_center_scale, keypoints_to_crop, warp_crop

INPUT_HW = (256, 192)
CODEC = UDPHeatmap.for_input(INPUT_HW)


def test_oracle_heatmaps_score_near_100(synth_data):
    """Ground truth encoded as heatmaps in each box's crop, decoded and projected back, scores ~AP 100."""
    ann = synth_data(1, 6, 3) / "annotations/person_keypoints_val.json"
    instances = load_instances(ann)
    boxes = gt_person_boxes(ann)
    heat, affines, areas = [], [], []
    for inst in instances:
        center, scale_wh = bbox_to_center_scale(inst.bbox_xywh)
        affine = CODEC.crop_affine(center, scale_wh, 0.0)
        kp = keypoints_to_crop(inst.keypoints, affine, False, COCO_17.flip_index)
        h, _ = CODEC.encode(kp)
        heat.append(h)
        affines.append(affine)
        areas.append(scale_wh[0] * scale_wh[1])
    kps = heatmaps_to_image(np.stack(heat), np.stack(affines), CODEC)
    labelled = np.stack([i.keypoints for i in instances])[..., 2] > 0
    inside = (np.stack([i.keypoints for i in instances])[..., :2] > 0).all(-1)
    err = np.linalg.norm(kps[..., :2] - np.stack([i.keypoints[:, :2] for i in instances]), axis=-1)
    assert np.median(err[labelled & inside]) < 0.5  # pixels in the original image
    metrics = coco_keypoint_metrics(ann, coco_results(boxes, kps, np.asarray(areas), COCO_17))
    assert metrics["AP"] > 95.0


def test_box_crops_are_the_codecs_plain_crops_of_the_box(synth_data):
    from kdcache.images import read_image

    data = synth_data(1, 6, 3)
    ann = data / "annotations/person_keypoints_val.json"
    boxes = gt_person_boxes(ann)
    codec = UDPHeatmap.for_input((128, 96))
    item = BoxCrops(boxes, data / "val", codec)[1]
    center, scale_wh = bbox_to_center_scale(boxes[1].bbox_xywh)
    affine = codec.crop_affine(center, scale_wh, 0.0)
    np.testing.assert_array_equal(item["affine"], affine)
    image = read_image(data / "val" / boxes[1].file_name)
    np.testing.assert_array_equal(item["crop"], warp_crop(image, affine, (128, 96)))
    assert item["area"] == scale_wh[0] * scale_wh[1]
