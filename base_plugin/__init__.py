"""base-plugin: BASE layers (balanced assignment of experts) for DeepSpeed and Megatron-core, and SLAMB.

The core (:mod:`base_plugin.assignment`, :mod:`base_plugin.layer`) depends on torch only; the
integrations (:mod:`base_plugin.deepspeed`, :mod:`base_plugin.megatron`) import their frameworks lazily.
"""
__version__ = "0.1.0"
