"""Input normalization of the datasets dymu trains on: one table, read by both sides.

The datasets (training.data) normalize their images with these statistics, and artifacts written
by ``dymu train`` record them (``input_normalization``); the service reads them from the
artifact, and from this table (by the dataset name of the training record) for older artifacts
that do not record them. Keeping one table is what keeps the two sides in agreement.
"""

from __future__ import annotations

#: ``(mean, std)`` of [0, 1] RGB per channel.
Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]

#: ImageNet's statistics: the convention of the MTAN / MTI-Net pipelines and of
#: ImageNet-pretrained encoders (the natural-image datasets use them).
IMAGENET: Normalization = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

#: By the dataset name of ``training.data.DATASETS``.
DATASET_NORMALIZATION: dict[str, Normalization] = {
    # Rendered scenes: measured on 2,000 images of seed 0 at 96x128.
    "scenes": ((0.323, 0.322, 0.322), (0.183, 0.181, 0.180)),
    # The digit pairs: measured on the generated images (grey, so one value per channel).
    "multidigits": ((0.25, 0.25, 0.25), (0.33, 0.33, 0.33)),
    # CIFAR-100's training-set statistics.
    "cifar100-20": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "nyuv2": IMAGENET,
    "pascal-context": IMAGENET,
}
