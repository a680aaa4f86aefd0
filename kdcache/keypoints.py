"""The COCO person-keypoint definition shared by every stage."""

KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)

# COCO's skeleton as written in person_keypoints_*.json: 1-based keypoint indices.
SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
    (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)

# Left/right pairs (0-based) swapped by a horizontal mirror.
FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))


def _flip_index() -> tuple[int, ...]:
    index = list(range(NUM_KEYPOINTS))
    for left, right in FLIP_PAIRS:
        index[left], index[right] = right, left
    return tuple(index)


# FLIP_INDEX[k] is the keypoint that k becomes under a mirror: `mirrored = x[..., FLIP_INDEX, :]`.
FLIP_INDEX = _flip_index()

# Per-keypoint OKS sigmas used by COCOeval (for OKS-NMS).
OKS_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)

# Upper-body keypoints (ViTPose's half-body split); the rest are lower body.
UPPER_BODY = tuple(range(11))

# ImageNet normalisation that ViTPose and timm students are trained with, RGB order, 0-255 scale.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
