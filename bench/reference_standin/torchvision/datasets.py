"""ImageFolder: ROOT/<class>/<image>, classes sorted, images sorted within each class."""

import os

from PIL import Image

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder:
    def __init__(self, root, transform=None):
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.imgs = []
        for index, name in enumerate(self.classes):
            for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                for file in sorted(files):
                    if file.lower().endswith(EXTENSIONS):
                        self.imgs.append((os.path.join(folder, file), index))
        self.transform = transform

    def __len__(self):
        return len(self.imgs)

    def __getitem__(self, index):
        path, target = self.imgs[index]
        with open(path, "rb") as handle:
            image = Image.open(handle).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, target
