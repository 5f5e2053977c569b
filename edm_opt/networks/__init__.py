"""Networks: EDM2's magnitude-preserving U-Net, EDM's DDPM++ U-Net, and the preset registry."""

from edm_opt.networks.ddpmpp import DDPMppPrecond
from edm_opt.networks.edm2 import EDM2Precond
from edm_opt.networks.presets import Preset, build_network, get_preset, list_presets

__all__ = ["DDPMppPrecond", "EDM2Precond", "Preset", "build_network", "get_preset", "list_presets"]
