"""Configuration, checked before any process group starts: the ``checkfree`` section of the
DeepSpeed JSON (``checkfree``), its cross-checks against the rest of the DeepSpeed config
(``deepspeed_checks``), the closed sets of allowed values (``modes``), which layers live on which
stage as a pure function of them (``layout``) and the run options of
``launch/train.py`` (``options``)."""
from ds_checkfree.config.checkfree import CheckFreeConfig, ConfigError

__all__ = ["CheckFreeConfig", "ConfigError"]
