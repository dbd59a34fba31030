"""Attention kernels a scheme can select (`attention: int8_flash`): each a torch reference of its arithmetic
and, where there is one, a Triton kernel tested against it."""
from harness.attention.int8_flash import int8_flash_reference
from harness.attention.interface import int8_flash, int8_flash_attention

#: scheme `attention` value -> (interface function, its fixed keyword arguments)
KERNELS = {"int8_flash": (int8_flash_attention, {"variant": "full"}),
           "int8_flash_half": (int8_flash_attention, {"variant": "half"})}

__all__ = ["KERNELS", "int8_flash", "int8_flash_attention", "int8_flash_reference"]
