"""Data sources for dVAE training: float32 [C, H, W] crops in [0, 1], served by one LightningDataModule.

Sources: `photos` (scikit-image's bundled photographs, offline), `shapes` (procedural), `folder` (any
directory of images), `mnist` and `cifar10` (torchvision).
"""

from dvae.data.datamodule import SOURCES, DVAEDataModule, build_datamodule

__all__ = ["SOURCES", "DVAEDataModule", "build_datamodule"]
