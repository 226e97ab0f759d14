"""Networks: PDM's U-Net on the patched grid, and the converter for official weights."""

from pdm.nn.convert import convert_official_state_dict
from pdm.nn.unet import UNet

__all__ = ["UNet", "convert_official_state_dict"]
