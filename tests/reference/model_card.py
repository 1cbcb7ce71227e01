"""The NVLM-D-72B model card's image preprocessing, written the card's way, as an independent reference.

``build_transform``, ``find_closest_aspect_ratio``, ``dynamic_preprocess`` and ``load_image`` follow the
card line by line. torchvision cannot be installed beside this torch, so its three transforms are spelled
out as torchvision implements them for PIL input: ``Resize((448, 448), BICUBIC)`` is ``img.resize((448,
448), BICUBIC)``; ``ToTensor`` is ``torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float()
.div(255)``; ``Normalize`` is ``tensor.clone().sub_(mean[:, None, None]).div_(std[:, None, None])``.
(Recent torchvision returns a PIL image already at the target size from ``Resize`` unchanged; PIL returns a
copy: the same pixels either way.) Two additions to the card's ``load_image``: it also takes a PIL image
(converted to RGB the same way) and a ``use_thumbnail`` switch (the card hard-codes True); ``max_num``
defaults to 6, the value the card's example passes (the helper's own default is 12).
"""

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(input_size):
    def transform(img):
        img = img.convert("RGB") if img.mode != "RGB" else img
        img = img.resize((input_size, input_size), Image.BICUBIC)
        t = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
        t = t.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)
        mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)
        return t.clone().sub_(mean).div_(std)

    return transform


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image, min_num=1, max_num=6, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target_aspect_ratio = find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def load_image(image_file, input_size=448, max_num=6, use_thumbnail=True):
    image = image_file if isinstance(image_file, Image.Image) else Image.open(image_file)
    image = image.convert("RGB")
    transform = build_transform(input_size=input_size)
    images = dynamic_preprocess(image, image_size=input_size, use_thumbnail=use_thumbnail, max_num=max_num)
    return torch.stack([transform(image) for image in images])
