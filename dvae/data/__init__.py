"""Data sources for dVAE training: float32 [C, H, W] crops in [0, 1], served by one LightningDataModule
(`dvae.data.datamodule`). The image helpers here load without Lightning: dvae-encode reads folders with them.

Sources: `photos` (scikit-image's bundled photographs, offline), `shapes` (procedural), `folder` (any
directory of images), `mnist` and `cifar10` (torchvision), `imagenet`, `celeba` and `webdataset`.
"""
