"""gpuherd core: the product. Surfaces (bot/, notebook_ext/) call `core.service.GpuService`."""

__version__ = "0.1.0"
