"""torchtune glue for iw-SFT: dataset builders (:mod:`iwsft.tune.datasets`), the collate function that keeps
``sample_id``/``quality`` (:mod:`iwsft.tune.collate`) and the ``tune`` CLI registration (:mod:`iwsft.tune.registry`).

Kept import-free on purpose: the registry hook loads ``registry.py`` during torchtune's own import, and configs
name the submodules by dotpath, so nothing here may pull in torch or torchtune eagerly.
"""
