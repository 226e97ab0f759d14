"""Networks: the ADM-family U-Net that runs on the patched grid."""

from pdm.nn.unet import UNet

__all__ = ["UNet"]
